from __future__ import annotations

import sys
from pathlib import Path

import click

from ._shared import gate_options


@click.command("sensitivity")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--layers",
    multiple=True,
    metavar="PATTERN",
    help="Only the FP8 layers matching this glob (repeatable), e.g. 'text.layers.1.*' "
    "('vision.*' needs artifacts built with --fp8-vision)  [default: every FP8 layer of the "
    "artifacts]",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for sensitivity.json and sensitivity.md  [default: FOLDER/sensitivity]",
)
@gate_options
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Layers to print (the report files list all).",
)
def command(folder, layers, thresholds, report_dir, evalset, steps, checkpoint, prefill_chunk, top):
    """Rank an fp8 artifact folder's FP8 layers by how much of the accuracy gate's fp8 budget
    each uses alone (the float32 PyTorch reference with one layer in FP8, judged by the gate).
    The top layers are the candidates for `build --fp8-exclude`. The report is rewritten after
    every layer, so an interrupted run keeps the rows it finished (marked incomplete).

    \b
    Examples:
      mllama-export sensitivity out/tiny-fp8 --layers 'text.layers.4.*'
      mllama-export sensitivity out/tiny-fp8 --layers 'text.layers.1.*' --steps 2 --top 5
    """
    from mllama_export.validate.gate import load_cases
    from mllama_export.validate.sensitivity import run_sensitivity

    out = report_dir if report_dir is not None else folder / "sensitivity"
    cases = load_cases(evalset, folder) if evalset is not None else None
    try:
        report = run_sensitivity(
            folder,
            layers=layers,
            thresholds=thresholds,
            cases=cases,
            steps=steps,
            checkpoint=checkpoint,
            out_dir=out,
            prefill_chunk=prefill_chunk,
        )
    except KeyboardInterrupt:
        click.echo(f"interrupted; the layers finished so far are in {out}", err=True)
        sys.exit(130)
    click.echo(f"{'rank':>4}  {'budget':>7}  {'rel/cos/KL':>10}  layer")
    combined = report.combined
    click.echo(f"{'all':>4}  {combined.budget:7.3f}  {combined.continuous:10.3f}  {combined.label}")
    for i, layer in enumerate(report.layers[:top], start=1):
        click.echo(f"{i:4d}  {layer.budget:7.3f}  {layer.continuous:10.3f}  {layer.label}")
    click.echo(f"wrote {out / 'sensitivity.json'}, sensitivity.md")
    if report.suggestion is not None:
        sug = report.suggestion
        left = "none left" if sug.remaining is None else f"budget {sug.remaining.budget:.3f}"
        why = (
            f"all together within the fp8 limits, but above {sug.target} of them; for that margin, "
            if report.combined.report.passed
            else ""
        )
        click.echo(
            f"{why}keeping the top {len(sug.exclude)} layer(s) in 16 bits leaves {left} "
            f"(target {sug.target}); rebuild with:"
        )
        click.echo(f"  {report.rebuild_command()}")
    click.echo(report.summary_line())
