"""LLaVA's checkpoint format (its "checkpoint_format" part): the declarative weight-name table,
the tensors a llava-hf checkpoint carries without using, the buffers it lacks, and the refusal
of the original repository's layout. The strict reader, loader and synthetic writer are
graphs/checkpoint.py's and graphs/synthetic.py's, for every family.

The checks run on the safetensors headers alone: every tensor the graphs use must be there with
the shape the config implies, and every other tensor must be one a LLaVA checkpoint is known to
carry without using (CLIP's post-layernorm, tower layers past the deepest feature layer, the
lm_head of a tied model); anything else is refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mllama_export.errors import MllamaExportError

from .checkpoint import CheckpointFormat
from .llava_config import LlavaConfig
from .llava_synth import describe, write_side_files
from .llava_text import text_inv_freq

# (checkpoint prefix, our prefix), first match wins. The first five rows are the names of the
# published llava-hf checkpoints; transformers 5.x save_pretrained drops CLIP's `vision_model.`
# (row six); the last five are its in-memory names, found in files written from state_dict().
WEIGHT_TABLE: tuple[tuple[str, str], ...] = (
    ("language_model.lm_head.", "text.lm_head."),
    ("language_model.model.", "text."),
    ("vision_tower.vision_model.", "vision."),
    ("multi_modal_projector.", "projector."),
    ("image_newline", "image_newline"),
    ("vision_tower.", "vision."),
    ("lm_head.", "text.lm_head."),
    ("model.language_model.", "text."),
    ("model.vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("model.image_newline", "image_newline"),
)
PUBLISHED_ROWS = 5
# The original LLaVA repository's names: refused with the conversion script to use.
ORIGINAL_FORMAT = re.compile(r"(^|\.)mm_projector\.|vision_tower\.vision_tower\.")


def unused_shapes(config: LlavaConfig) -> dict[str, tuple[int, ...]]:
    """Tensors a transformers checkpoint of this config holds that no LLaVA output depends on
    (written by the synthetic writer as well): CLIP's post-layernorm and its layers past the
    deepest feature layer."""
    v = config.vision
    d, i = v.hidden_size, v.intermediate_size
    shapes = {"vision.post_layernorm.weight": (d,), "vision.post_layernorm.bias": (d,)}
    layer = {
        "layer_norm1.weight": (d,),
        "layer_norm1.bias": (d,),
        "layer_norm2.weight": (d,),
        "layer_norm2.bias": (d,),
        "mlp.fc1.weight": (i, d),
        "mlp.fc1.bias": (i,),
        "mlp.fc2.weight": (d, i),
        "mlp.fc2.bias": (d,),
        **{f"self_attn.{p}_proj.weight": (d, d) for p in ("q", "k", "v", "out")},
        **{f"self_attn.{p}_proj.bias": (d,) for p in ("q", "k", "v", "out")},
    }
    for n in range(config.vision_depth, v.num_layers):
        shapes.update({f"vision.encoder.layers.{n}.{k}": s for k, s in layer.items()})
    return shapes


def optional_shapes(config: LlavaConfig) -> dict[str, tuple[int, ...]]:
    """A tied model's lm_head: transformers saves it once, as the embedding; a file written
    from a state_dict holds it twice. Accepted either way, never read."""
    t = config.text
    return {"text.lm_head.weight": (t.vocab_size, t.hidden_size)} if config.tied_lm_head else {}


def check_names(folder: Path, names: list[str]) -> None:
    original = [n for n in names if ORIGINAL_FORMAT.search(n)]
    if original:
        raise MllamaExportError(
            f"{folder} holds the original LLaVA repository's weights ({original[0]}, ...); "
            "convert them with transformers' src/transformers/models/llava/"
            "convert_llava_weights_to_hf.py (or llava_next/convert_llava_next_weights_to_hf.py)"
        )


def computed_buffers(config: LlavaConfig) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (the rope frequencies): not in the checkpoint, rebuilt."""
    return {"text.rotary.inv_freq": text_inv_freq(config.text)}


# LLaVA's "checkpoint_format" part (graphs/llava_family.py)
FORMAT = CheckpointFormat(
    table=WEIGHT_TABLE,
    published=PUBLISHED_ROWS,
    model="the LLaVA model",
    buffers=computed_buffers,
    side_files=write_side_files,
    describe=describe,
    unused=unused_shapes,
    optional=optional_shapes,
    check_names=check_names,
)
our_name = FORMAT.our_name
checkpoint_name = FORMAT.checkpoint_name
