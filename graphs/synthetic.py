"""Synthetic checkpoints of any family in the real Hugging Face format, every tensor random
and consequential: the family's model says which tensors (graphs/checkpoint.py), its
"checkpoint_format" part their published names and the files written beside them."""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mllama_export.errors import MllamaExportError

from .checkpoint import checkpoint_format, expected_shapes
from .family import Family, family_of
from .progress import bar


def parameter_shapes(config: Any, family: Family | None = None) -> dict[str, torch.Size]:
    """Our names -> shapes of every tensor a synthetic checkpoint holds (the model's, and the
    ones published checkpoints carry unused), sorted by name: the order the generator is
    consumed in."""
    family = family or family_of(config)
    shapes = {**checkpoint_format(family).unused(config), **expected_shapes(config, family)}
    return {n: torch.Size(shapes[n]) for n in sorted(shapes)}


def random_tensors(
    config: Any, seed: int = 0, family: Family | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, random float32 tensor), one at a time, the same for the same seed.

    Scales keep activations of order one through every layer, and every tanh gate is pushed
    well away from zero (transformers initializes them to 0, which would hide whole branches).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, shape in parameter_shapes(config, family).items():
        yield name, _random_tensor(name, shape, gen)


def random_state_dict(
    config: Any, seed: int = 0, family: Family | None = None
) -> dict[str, torch.Tensor]:
    """Our parameter names -> random float32 tensors: `random_tensors` gathered, without the
    tensors a checkpoint carries unused (the model's own state, the checkpoint's values)."""
    model = expected_shapes(config, family)
    return {n: t for n, t in random_tensors(config, seed, family) if n in model}


def _random_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    # In-place arithmetic: an 11B embedding is 2 GB in float32, and a temporary would double it.
    normal = torch.randn(shape, generator=gen)
    leaf = name.rsplit(".", 1)[-1]
    if "gate" in leaf and len(shape) == 1 and shape[0] == 1:
        sign = 1.0 if torch.rand(1, generator=gen).item() < 0.7 else -1.0
        return sign * (0.4 + 0.8 * torch.rand(shape, generator=gen))
    if "norm" in name and leaf == "weight":
        return normal.mul_(0.2).add_(1.0)
    if leaf == "bias":
        return normal.mul_(0.1)
    if "embed" in name or "embedding" in name:
        return normal.mul_(0.5) if "tile" in name or "positional" in name else normal
    if len(shape) == 1:
        # a learned vector that stands for a token (LLaVA-NeXT's image_newline) weighs as
        # much as an embedding row
        return normal
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return normal.div_(math.sqrt(fan_in))


def write_checkpoint(
    config: Any,
    out: str | Path,
    seed: int = 0,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
    family: Family | None = None,
) -> Path:
    """Writes config.json, the safetensors under the family's published names, and the
    family's side files (Mllama: the preprocessor config; the tokenizer files too where the
    vocabulary is the tiny one's).

    Tensors are generated one at a time and each shard is written as soon as it is full, so an
    11B checkpoint never needs more memory than one shard and one float32 tensor. `shards=N`
    splits them into N files of about equal size; `max_shard_bytes` fills each file up to that
    size instead. More than one file gets a `model.safetensors.index.json`.
    """
    out, family = Path(out), family or family_of(config)
    names = checkpoint_format(family)
    sizes = {
        name: shape.numel() * dtype.itemsize
        for name, shape in parameter_shapes(config, family).items()
    }
    groups = shard_plan(sizes, shards, max_shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    tensors = bar(
        random_tensors(config, seed, family), sum(sizes.values()), "writing random weights", "B",
        lambda named: sizes[named[0]],
    )  # fmt: skip
    files = _write_shards(tensors, groups, dtype, out, names.checkpoint_name)
    if len(files) > 1:
        _write_index(files, sum(sizes.values()), out)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    if names.side_files is not None:
        names.side_files(config, out)
    return out


def shard_plan(
    sizes: dict[str, int], shards: int = 1, max_shard_bytes: int | None = None
) -> list[list[str]]:
    """Contiguous groups of names (in the order of `sizes`), one group per shard file."""
    names = list(sizes)
    if max_shard_bytes is not None:
        if shards > 1:
            raise MllamaExportError(
                f"shards={shards} and max_shard_bytes={max_shard_bytes}: give one or the other"
            )
        if max_shard_bytes < 1:
            raise MllamaExportError(f"max_shard_bytes {max_shard_bytes}: expected at least 1")
        return _filled_groups(names, sizes, max_shard_bytes)
    if not 1 <= shards <= len(names):
        raise MllamaExportError(
            f"shards={shards}: expected between 1 and the {len(names)} tensors of the model"
        )
    return _even_groups(names, sizes, shards)


def _filled_groups(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    filled = 0
    for name in names:
        # A tensor bigger than the limit gets a shard of its own rather than an error.
        if groups[-1] and filled + sizes[name] > limit:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += sizes[name]
    return groups


def _even_groups(names: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    ends = list(itertools.accumulate(sizes[n] for n in names))
    total = ends[-1]
    bounds = [0]
    for k in range(1, shards):
        target = total * k / shards
        i = bisect.bisect_left(ends, target)  # tensor i holds the target byte
        start = ends[i] - sizes[names[i]]
        cut = i if target - start < ends[i] - target else i + 1
        # Every shard keeps at least one tensor, so the file count is exactly `shards`.
        bounds.append(min(max(cut, bounds[-1] + 1), len(names) - (shards - k)))
    bounds.append(len(names))
    return [names[a:b] for a, b in itertools.pairwise(bounds)]


def _write_shards(
    tensors: Iterator[tuple[str, torch.Tensor]],
    groups: list[list[str]],
    dtype: torch.dtype,
    out: Path,
    checkpoint_name: Callable[[str], str],
) -> dict[str, list[str]]:
    """Saves each group as soon as its last tensor exists, each tensor under the name
    ``checkpoint_name`` gives it; returns file -> checkpoint names."""
    n = len(groups)
    files: dict[str, list[str]] = {}
    for i, group in enumerate(groups, start=1):
        file = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        shard = {}
        for expected, (name, tensor) in zip(
            group, itertools.islice(tensors, len(group)), strict=True
        ):
            assert name == expected, f"generated {name} where the plan has {expected}"
            shard[checkpoint_name(name)] = tensor.to(dtype).contiguous()
            del tensor  # the float32 original must not live on while the next one is drawn
        save_file(shard, out / file, metadata={"format": "pt"})
        files[file] = list(shard)
    return files


def _write_index(files: dict[str, list[str]], total_bytes: int, out: Path) -> None:
    weight_map = {name: file for file, names in files.items() for name in names}
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
