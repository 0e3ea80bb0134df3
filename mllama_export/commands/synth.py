from __future__ import annotations

from pathlib import Path

import click

from mllama_export.errors import MllamaExportError


@click.command("synth")
@click.option(
    "--preset",
    "name",
    type=click.Choice(["tiny", "11b", "90b"]),
    default="tiny",
    show_default=True,
    help="Model geometry to write.",
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
    help="Number of safetensors shards; above 1 an index file is written too.",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="Storage dtype of the tensors.",
)
def command(name: str, out: Path, seed: int, shards: int, dtype: str) -> None:
    """Write a synthetic checkpoint in the Hugging Face format, every weight random.

    Every tensor (tanh gates included) is random and moves the logits; the same seed gives
    the same bytes. The tiny preset also gets a working tokenizer and chat template.
    """
    import torch

    from mllama_export.graphs.config import preset
    from mllama_export.graphs.synth import write_checkpoint

    if shards < 1:
        raise MllamaExportError(f"--shards {shards}: expected at least 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MllamaExportError(f"{out} exists and is not an empty folder; choose another --out")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise MllamaExportError(
            f"--out {out}: {parent} is a file; expected a folder to write the checkpoint into"
        )
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    write_checkpoint(preset(name), out, seed=seed, shards=shards, dtype=torch_dtype)
    click.echo(f"wrote a synthetic {name} checkpoint to {out}")
