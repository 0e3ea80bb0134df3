"""Synthetic LLaVA checkpoints in the llava-hf format: config.json and sharded safetensors, every
tensor random, the ones a real checkpoint carries unused (CLIP's post-layernorm, tower layers
past the feature layer) included. The tokenizer and processor files: engines/llava_synth.py."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .llava_config import LlavaConfig
from .llava_weights import llava_checkpoint_name, unused_shapes, used_shapes
from .synthetic import _random_tensor, _write_index, shard_plan


def llava_parameter_shapes(config: LlavaConfig) -> dict[str, tuple[int, ...]]:
    """Our names -> shapes of every tensor a checkpoint holds, sorted: the generator's order."""
    shapes = {**unused_shapes(config), **used_shapes(config)}
    if config.tied_lm_head:
        shapes.pop("text.lm_head.weight")  # transformers saves a tied head once, as the embedding
    return dict(sorted(shapes.items()))


def llava_random_tensors(config: LlavaConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, random float32 tensor), one at a time, the same for the same seed.

    Scales as for Mllama (graphs/synth.py); the newline vector is drawn like an embedding row,
    so that it weighs as much as the features it closes.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, shape in llava_parameter_shapes(config).items():
        if name == "image_newline":
            yield name, torch.randn(shape, generator=gen)
        else:
            yield name, _random_tensor(name, torch.Size(shape), gen)


def write_llava_weights(
    config: LlavaConfig,
    out: str | Path,
    seed: int = 0,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
) -> Path:
    """config.json, generation_config.json and the safetensors shards (with an index when there
    is more than one), written tensor by tensor as for Mllama."""
    out = Path(out)
    sizes = {
        n: torch.Size(s).numel() * dtype.itemsize for n, s in llava_parameter_shapes(config).items()
    }
    groups = shard_plan(sizes, shards, max_shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_shards(llava_random_tensors(config, seed), groups, dtype, out)
    if len(files) > 1:
        _write_index(files, sum(sizes.values()), out)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    t = config.text
    generation = {
        "bos_token_id": t.bos_token_id,
        "eos_token_id": list(t.eos_token_ids),
        "pad_token_id": config.pad_token_id if config.pad_token_id is not None else t.pad_token_id,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def _write_shards(
    tensors: Iterator[tuple[str, torch.Tensor]],
    groups: list[list[str]],
    dtype: torch.dtype,
    out: Path,
) -> dict[str, list[str]]:
    n = len(groups)
    files: dict[str, list[str]] = {}
    for i, group in enumerate(groups, start=1):
        file = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        shard = {}
        for expected, (name, tensor) in zip(
            group, itertools.islice(tensors, len(group)), strict=True
        ):
            assert name == expected, f"generated {name} where the plan has {expected}"
            shard[llava_checkpoint_name(name)] = tensor.to(dtype).contiguous()
            del tensor
        save_file(shard, out / file, metadata={"format": "pt"})
        files[file] = list(shard)
    return files
