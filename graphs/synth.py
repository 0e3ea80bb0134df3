"""Synthetic checkpoints in the real Hugging Face format, every tensor random and consequential."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import MllamaConfig
from .model import MllamaModel
from .weights import checkpoint_name


def random_state_dict(config: MllamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Our parameter names -> random float32 tensors, the same for the same seed.

    Scales keep activations of order one through every layer, and every tanh gate is pushed
    well away from zero (transformers initializes them to 0, which would hide whole branches).
    """
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in MllamaModel(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {name: _random_tensor(name, shape, gen) for name, shape in sorted(shapes.items())}


def _random_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    normal = torch.randn(shape, generator=gen)
    leaf = name.rsplit(".", 1)[-1]
    if "gate" in leaf and len(shape) == 1 and shape[0] == 1:
        sign = 1.0 if torch.rand(1, generator=gen).item() < 0.7 else -1.0
        return sign * (0.4 + 0.8 * torch.rand(shape, generator=gen))
    if "norm" in name and leaf == "weight":
        return 1.0 + 0.2 * normal
    if leaf == "bias":
        return 0.1 * normal
    if "embed" in name or "embedding" in name:
        return normal * (0.5 if "tile" in name or "positional" in name else 1.0)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return normal / math.sqrt(fan_in)


def write_checkpoint(
    config: MllamaConfig, out: str | Path, seed: int = 0, shards: int = 1, dtype=torch.float32
) -> Path:
    """Writes config.json, safetensors (sharded with an index when shards > 1) and the
    preprocessor config; the tokenizer files too where the vocabulary is the tiny one's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        checkpoint_name(n): t.to(dtype).contiguous()
        for n, t in random_state_dict(config, seed).items()
    }
    _write_tensors(tensors, out, shards)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    write_side_files(config, out)
    return out


def _write_tensors(tensors: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(tensors, out / "model.safetensors", metadata=meta)
        return
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, out / file, metadata=meta)
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_side_files(config: MllamaConfig, out: Path) -> None:
    from mllama_export.engines.preprocess import default_preprocessor_config
    from mllama_export.engines.text import write_synthetic_tokenizer

    t, v = config.text, config.vision
    generation = {"bos_token_id": t.bos_token_id, "eos_token_id": list(t.eos_token_ids)}
    generation["pad_token_id"] = t.pad_token_id
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    preprocessor = default_preprocessor_config(v.image_size, v.max_num_tiles)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    # A trained BPE vocabulary needs real text per token: only the tiny vocabulary gets one.
    if t.vocab_size <= 666:
        write_synthetic_tokenizer(
            out, vocab_size=t.vocab_size, image_token_id=config.image_token_id
        )
