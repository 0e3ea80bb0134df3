"""Options that several commands take, declared once."""

from __future__ import annotations

from pathlib import Path

import click

from mllama_export.graphs.choices import BACKENDS, DEFAULT_BACKEND, DEVICES


def preset_names() -> tuple[str, ...]:
    """Every registered family's presets, for --help (graphs/family.py; no torch imported)."""
    from mllama_export.graphs.family import all_presets

    return tuple(all_presets())


def graph_names() -> tuple[str, ...]:
    """Every registered family's graph names, in the order each family runs them."""
    from mllama_export.graphs.family import families

    names: dict[str, None] = {}
    for family in families():
        names.update(dict.fromkeys(family.graphs))
    return tuple(names)


def backend_option(help: str):
    return click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default=DEFAULT_BACKEND,
        show_default=True,
        help=help,
    )


device_option = click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="cpu",
    show_default=True,
    help="cpu or cuda: ONNX Runtime's provider (TensorRT always runs on the GPU).",
)


prefill_chunk_option = click.option(
    "--prefill-chunk",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Push the prompt through the decode (step) graph N tokens at a time, so prefill's "
    "memory is bounded by N, not by the prompt  [default: the whole prompt at once]",
)


def gate_options(command):
    """What the accuracy gate runs on: thresholds, cases, steps and the reference weights
    (`validate` and `sensitivity`)."""
    options = [
        click.option(
            "--thresholds",
            type=click.Path(path_type=Path),
            default=None,
            help="Drift limits (JSON, the schema of the packaged thresholds.json).",
        ),
        click.option(
            "--evalset",
            type=click.Path(path_type=Path),
            default=None,
            help="Folder with prompts.jsonl and its images, instead of the built-in "
            "evaluation set.",
        ),
        click.option(
            "--steps",
            type=click.IntRange(min=0),
            default=8,
            show_default=True,
            help="Decode steps compared per case (teacher-forced).",
        ),
        click.option(
            "--checkpoint",
            type=click.Path(path_type=Path),
            default=None,
            help="The checkpoint the artifacts were built from  [default: the manifest's "
            "model.source, or the re-synthesized preset]",
        ),
        prefill_chunk_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command
