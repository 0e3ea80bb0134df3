"""A checkpoint as a new user would bring one: built and saved by transformers itself.

    python benchmarks/hf_checkpoint.py --out ckpt/hard [--seed 0] [--kv-heads 1]
        [--layers 6] [--cross 0,3] [--gain 6]

transformers' ``MllamaForConditionalGeneration`` from a config of tiny's widths with the
choices our own presets never make together: one KV head (multi-query attention), head_dim 16,
a cross-attention layer first (layer 0), llama3 rope scaling. Every parameter is randomized
in place on the transformers model (transformers initializes the tanh gates to zero, which
would hide whole branches), then written by ``save_pretrained`` in its own names, shards and
dtype, with the tokenizer and preprocessor config beside it. Nothing of our weight table or
synthesizer writes the tensors, so the build reads them the way it reads a real checkpoint.

The text decoder's matrices are drawn at ``gain``/sqrt(fan_in) (the vision encoder's at
1/sqrt(fan_in)): with the default 6 its attention is sharp and its FP8 drift large, the
hard case of docs/accuracy.md (a whole-graph comparison refused it; the gate fails it, and
`mllama-export sensitivity` finds the layers to keep in 16 bits).
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch

from mllama_export.graphs.config import MllamaConfig, preset
from mllama_export.graphs.synth import write_side_files


def hf_config(kv_heads: int = 1, cross: tuple[int, ...] = (0, 3), layers: int = 6) -> dict:
    """tiny's widths (hidden 64, 4 heads of 16), ``kv_heads`` KV heads, ``layers`` text
    layers with cross-attention at ``cross``, llama3 rope scaling."""
    config = copy.deepcopy(preset("tiny").to_hf_dict())
    config["text_config"].update(
        num_key_value_heads=kv_heads, num_hidden_layers=layers, cross_attention_layers=list(cross)
    )
    config["torch_dtype"] = "float32"
    return config


def randomize(model: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Every parameter of a transformers model drawn anew: matrices at 1/sqrt(fan_in), norm
    weights around 1, biases small, tanh gates well away from zero (either sign)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if "gate" in name and param.numel() == 1:
                sign = 1.0 if torch.rand(1, generator=gen).item() < 0.7 else -1.0
                param.copy_(sign * (0.4 + 0.8 * torch.rand(param.shape, generator=gen)))
            elif "norm" in name and leaf == "weight":
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif leaf == "bias":
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif "embed" in name or "embedding" in name:
                scale = 0.5 if "tile" in name or "positional" in name else 1.0
                param.copy_(scale * torch.randn(param.shape, generator=gen))
            else:
                fan_in = math.prod(param.shape[1:]) if param.dim() > 1 else param.shape[0]
                scale = (gain if "language_model" in name else 1.0) / math.sqrt(fan_in)
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def write_hf_checkpoint(
    out: str | Path,
    seed: int = 0,
    kv_heads: int = 1,
    cross: tuple[int, ...] = (0, 3),
    layers: int = 6,
    gain: float = 6.0,
    max_shard_size: str = "300KB",
) -> Path:
    """Builds, randomizes and ``save_pretrained``s the model; returns ``out``."""
    from transformers import MllamaConfig as HFConfig
    from transformers import MllamaForConditionalGeneration

    config = hf_config(kv_heads, cross, layers)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(HFConfig(**config)).eval()
    randomize(model, seed, gain)
    out = Path(out)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    write_side_files(MllamaConfig.from_hf_config(out), out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--cross", default="0,3", help="cross-attention layers, e.g. 0,3")
    parser.add_argument("--layers", type=int, default=6, help="text layers")
    parser.add_argument("--gain", type=float, default=6.0, help="text matrices' std x sqrt(fan_in)")
    args = parser.parse_args()
    cross = tuple(int(i) for i in args.cross.split(","))
    path = write_hf_checkpoint(args.out, args.seed, args.kv_heads, cross, args.layers, args.gain)
    print(f"wrote {path} (transformers save_pretrained)")


if __name__ == "__main__":
    main()
