"""Mllama's synthetic checkpoints: what graphs/synthetic.py writes beside the weights (the
generation and preprocessor configs, the tokenizer of the tiny vocabulary), the geometry in
words, and the shallower configs of `synth --text-layers ...` (Mllama's "truncated" part)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import MllamaConfig, truncated
from .synth_files import default_preprocessor_config, write_synthetic_tokenizer
from .synthetic import parameter_shapes, random_state_dict, shard_plan, write_checkpoint

# the writer is every family's; tests and benchmarks import it from here as well
__all__ = [
    "parameter_shapes",
    "random_state_dict",
    "shard_plan",
    "write_checkpoint",
    "write_side_files",
]


def describe(config: MllamaConfig) -> str:
    t, v = config.text, config.vision
    return (
        f"{t.num_layers} text layers ({len(t.cross_attention_layers)} cross-attention), "
        f"{v.num_layers} vision + {v.num_global_layers} global vision layers"
    )


def shallower(
    config: MllamaConfig,
    text_layers: int | None = None,
    vision_layers: int | None = None,
    global_layers: int | None = None,
    cross_layers: tuple[int, ...] | None = None,
) -> MllamaConfig:
    """`truncated`, where a depth not given keeps the preset's, or with fewer text layers
    the preset's vision depths scaled alike (so that timings stay representative)."""
    t, v = config.text, config.vision
    text = t.num_layers if text_layers is None else text_layers

    def scaled(original: int) -> int:
        return max(1, round(original * text / t.num_layers))

    vision = scaled(v.num_layers) if vision_layers is None else vision_layers
    global_ = scaled(v.num_global_layers) if global_layers is None else global_layers
    return truncated(config, text, vision, global_, cross_layers)


def write_side_files(config: MllamaConfig, out: Path) -> None:
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
