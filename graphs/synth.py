"""Mllama's synthetic checkpoints: what graphs/synthetic.py writes beside the weights (the
generation and preprocessor configs, the tokenizer of the tiny vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import MllamaConfig
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
