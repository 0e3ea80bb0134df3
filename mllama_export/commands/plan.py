from __future__ import annotations

import sys

import click

from mllama_export.graphs.choices import (
    DEFAULT_TEXT_ENGINE,
    GPU_NAMES,
    PRECISIONS,
    TEXT_ENGINES,
)

from ._shared import preset_names

# build's defaults (exporter/fits.py DEFAULTS reads them from BuildOptions; a test keeps
# these in step), named here so that --help needs no import of the planner
_BUILD = "build's default"


@click.command("plan")
@click.option(
    "--model",
    required=True,
    help=f"A preset ({', '.join(preset_names())}), a checkpoint folder or its config.json, a Hugging Face "
    "Hub id, or an artifact folder (its manifest's precision and limits are the defaults).",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="As build's --precision; fp8: the text decoder's linear layers in FP8, the rest in "
    f"16 bits  [default: the artifacts', else {_BUILD} fp32]",
)
@click.option(
    "--max-batch",
    type=int,
    default=None,
    help=f"Batch at the profile maximum  [default: the artifacts', else {_BUILD} 4]",
)
@click.option(
    "--max-seq-len",
    type=int,
    default=None,
    help="Tokens per sequence at most  [default: the artifacts', else build's default: 512; "
    "LLaVA: room for --max-images of its largest images and 256 tokens of text]",
)
@click.option(
    "--max-images",
    type=int,
    default=None,
    help=f"Images per prompt at most  [default: the artifacts', else {_BUILD} 2]",
)
@click.option(
    "--gpu",
    type=click.Choice(GPU_NAMES),
    default="h100",
    show_default=True,
    help="GPU whose memory and roofline to plan against.",
)
@click.option(
    "--prompt-len",
    type=int,
    default=None,
    help="Prompt length for the prefill estimate [default: max-seq-len].",
)
@click.option(
    "--tiles", type=int, default=None, help="Tiles per image for the estimates [default: max]."
)
@click.option(
    "--text-engine",
    type=click.Choice(TEXT_ENGINES),
    default=None,
    help="The text engines to plan (as build --text-engine): split, prefill and decode "
    "engines holding the text weights twice; shared, one engine holding them once  "
    f"[default: the artifacts', else {_BUILD} {DEFAULT_TEXT_ENGINE}]",
)
def command(
    model, precision, max_batch, max_seq_len, max_images, gpu, prompt_len, tiles, text_engine
):
    """Print memory per engine and roofline lower bounds for decode and prefill. Exit 0 when
    the engines fit the GPU's memory; 1 when not, after what would fit (fewer tokens, a
    smaller batch, FP8, one text engine, a larger GPU, several GPUs); 2 on bad input. Both
    text engines follow side by side, with the largest batch and sequence each fits.

    \b
    Examples:
      mllama-export plan --model 11b --precision fp8 --max-seq-len 8192
      mllama-export plan --model 90b --precision fp8 --gpu h200 --max-batch 1 --max-images 1 --text-engine shared
      mllama-export plan --model out/tiny
    """
    planner = _family(model).part("plan")  # a family without a planner: refused in one line
    given = {
        "precision": precision,
        "max_batch": max_batch,
        "max_seq_len": max_seq_len,
        "max_images": max_images,
    }
    text, fits = planner.plan_text(
        planner.request(model, given, gpu, prompt_len, tiles, text_engine)
    )
    click.echo(text)
    sys.exit(0 if fits else 1)


def _family(model: str):
    """The family of --model: an artifact folder's manifest config, else the resolved model's."""
    from pathlib import Path

    from mllama_export.engines.manifest_read import MANIFEST, read_manifest
    from mllama_export.graphs.family import family_of_config
    from mllama_export.graphs.resolve import resolve_model

    if (Path(model) / MANIFEST).is_file():
        return family_of_config(read_manifest(model)["model"]["config"], f"{model}'s manifest")
    return resolve_model(model, config_file=True).family
