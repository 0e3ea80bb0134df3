from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.choices import PRECISION_DTYPES, STORAGE_PRECISIONS, spelled

from ._shared import preset_names

if TYPE_CHECKING:
    from mllama_export.graphs.resolve import ResolvedModel

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


@click.command("synth")
@click.option(
    "--preset",
    "name",
    default="tiny",
    show_default=True,
    help=f"Model geometry to write: {spelled(preset_names())}, or a checkpoint folder or Hugging Face "
    "Hub id whose config.json to copy (its weights are not read).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder to write the checkpoint into (must not exist, or be empty).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--shards",
    type=int,
    default=1,
    show_default=True,
    help="Number of safetensors shards of about equal size; above 1 an index file is written too.",
)
@click.option(
    "--max-shard-size",
    default=None,
    help="Fill each shard up to this size instead, e.g. 2GB, 500MB, 100KB or bytes "
    "(decimal units); not with --shards.",
)
@click.option(
    "--dtype",
    type=click.Choice(STORAGE_PRECISIONS),
    default="fp32",
    show_default=True,
    help="Storage dtype of the tensors.",
)
@click.option(
    "--text-layers",
    type=int,
    default=None,
    help="Keep only the first N text layers (and the cross-attention layers among them). "
    "[default: the preset's]",
)
@click.option(
    "--vision-layers",
    type=int,
    default=None,
    help="Keep only the first N local vision layers. [default: the preset's, scaled like "
    "--text-layers]",
)
@click.option(
    "--global-layers",
    type=int,
    default=None,
    help="Keep only the first N global vision layers. [default: the preset's, scaled like "
    "--text-layers]",
)
@click.option(
    "--cross-layers",
    default=None,
    help="Comma-separated indices of the cross-attention layers among the kept text layers. "
    "[default: the preset's that are kept]",
)
def command(
    name: str,
    out: Path,
    seed: int,
    shards: int,
    max_shard_size: str | None,
    dtype: str,
    text_layers: int | None,
    vision_layers: int | None,
    global_layers: int | None,
    cross_layers: str | None,
) -> None:
    """Write a synthetic checkpoint in the Hugging Face format, every weight random.

    Every tensor (tanh gates included) is random and moves the logits; the same seed gives
    the same bytes. The tiny preset also gets a working tokenizer and chat template. The layer
    options write a shallower model of the same widths, e.g. for benchmarks at the 11B
    geometry; its config.json describes that model, so `build --model` exports it.

    \b
    Examples:
      mllama-export synth --preset tiny --out ckpt/tiny --shards 3
      mllama-export synth --preset tiny --text-layers 3 --dtype bf16 --max-shard-size 2GB --out ckpt/tiny-3
    """
    import torch

    from mllama_export.graphs.checkpoint import checkpoint_format
    from mllama_export.graphs.synthetic import parameter_shapes

    if shards < 1:
        raise MllamaExportError(f"--shards {shards}: expected at least 1")
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    if max_bytes is not None and shards > 1:
        raise MllamaExportError(
            f"--shards {shards} and --max-shard-size {max_shard_size}: give one or the other"
        )
    cross = None if cross_layers is None else _parse_indices(cross_layers)
    source = _source(name)
    family = source.family
    config = _config(source, (text_layers, vision_layers, global_layers), cross)
    _check_out(out)
    torch_dtype = getattr(torch, PRECISION_DTYPES[dtype])
    family.part("synth")(config, out, seed, shards, torch_dtype, max_shard_bytes=max_bytes)
    params = sum(s.numel() for s in parameter_shapes(config, family).values())
    files = len(list(out.glob("*.safetensors")))
    describe = checkpoint_format(family).describe
    geometry = f"{describe(config)}; " if describe is not None else ""
    click.echo(
        f"wrote a synthetic {name} checkpoint to {out}: {geometry}{params:,} parameters, "
        f"{_human(params * torch_dtype.itemsize)} of {dtype} in {files} shard(s)"
    )


def _human(size: int) -> str:
    unit = next(u for u in ("TB", "GB", "MB", "KB", "B") if size >= SIZE_UNITS[u] or u == "B")
    return f"{size / SIZE_UNITS[unit]:.2f} {unit}"


def _parse_indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(i) for i in text.split(","))
    except ValueError:
        raise MllamaExportError(
            f"--cross-layers {text!r}: expected comma-separated layer indices such as 1 or 3,8"
        ) from None


def parse_size(text: str) -> int:
    """'2GB', '500MB', '100KB', '1.5GB' or a plain number of bytes (decimal units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", text.upper())
    size = int(float(match[1]) * SIZE_UNITS[match[2] or ""]) if match else 0
    if size < 1:
        raise MllamaExportError(
            f"--max-shard-size {text!r}: expected a positive size such as 2GB, 500MB, 100KB "
            "or a number of bytes"
        )
    return size


def _source(name: str) -> ResolvedModel:
    from mllama_export.graphs.resolve import resolve_model

    return resolve_model(name, "--preset", config_file=True)


def _config(
    source: ResolvedModel,
    layers: tuple[int | None, int | None, int | None],
    cross: tuple[int, ...] | None,
):
    """The preset (or a checkpoint's config), or its first layers where any of the layer
    options was given (the family's "truncated" part: Mllama's scales the vision depths
    with the text depth where they are not given)."""
    if layers == (None, None, None) and cross is None:
        return source.config
    return source.family.part("truncated")(source.config, *layers, cross)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MllamaExportError(f"{out} exists and is not an empty folder; choose another --out")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise MllamaExportError(
            f"--out {out}: {parent} is a file; expected a folder to write the checkpoint into"
        )
