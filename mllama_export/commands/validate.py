from __future__ import annotations

import sys
from pathlib import Path

import click

from mllama_export.graphs.choices import REFERENCES

from ._shared import backend_option, device_option, gate_options


@click.command("validate")
@click.argument("folder", type=click.Path(path_type=Path))
@backend_option("What runs the graphs being judged.")
@click.option(
    "--reference",
    type=click.Choice(REFERENCES),
    default="graphs",
    show_default=True,
    help="graphs: our PyTorch graphs in float32. transformers: MllamaForConditionalGeneration "
    "in float32 (artifacts built with --xattn-mask hf only).",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for drift.json, drift.md and drift.png  [default: FOLDER/drift]",
)
@gate_options
@device_option
def command(
    folder,
    backend,
    reference,
    thresholds,
    report_dir,
    evalset,
    steps,
    checkpoint,
    prefill_chunk,
    device,
):
    """Judge an artifact folder's drift from the float32 PyTorch reference, stage by stage
    (vision K/V, prefill logits, every decode step, teacher-forced). Exit 0: pass, 1: drift
    over the limits, 2: bad input. The verdict is printed last; each case's line (stderr)
    names the metric that decides it, and drift.png shows it per stage. After an fp8
    failure, the worst stages and the way to the `--fp8-exclude` patterns that bring it
    under follow.

    \b
    Examples:
      mllama-export validate out/tiny
      mllama-export validate out/tiny --steps 2 --report out/tiny-drift
    """
    from mllama_export.validate.gate import load_cases, run_gate

    cases = load_cases(evalset, folder) if evalset is not None else None
    report = run_gate(
        folder,
        backend=backend,
        reference=reference,
        thresholds=thresholds,
        cases=cases,
        steps=steps,
        checkpoint=checkpoint,
        device=device,
        prefill_chunk=prefill_chunk,
    )
    from mllama_export.validate.sensitivity import fp8_advice

    paths = report.write(report_dir if report_dir is not None else folder / "drift")
    click.echo(f"wrote {paths['json']}, {paths['md'].name}, {paths['png'].name}")
    click.echo(report.summary_line())
    # fp8 over its limits: the worst stages, then what ranks the layers and what to exclude
    for line in fp8_advice(report, folder):
        click.echo(line)
    sys.exit(0 if report.passed else 1)
