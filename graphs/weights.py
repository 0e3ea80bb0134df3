"""Mllama's checkpoint format: its weight-name table and the buffers its checkpoints lack; the
strict reader and loader are graphs/checkpoint.py's, for every family."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Checkpoint, CheckpointFormat, check_folder
from .checkpoint import load_model as load_family_model
from .config import MllamaConfig
from .layers import rope_inv_freq
from .model import MllamaModel
from .synth import describe, write_side_files

__all__ = ["FORMAT", "WEIGHT_TABLE", "Checkpoint", "checkpoint_name", "load_model", "our_name"]

# (checkpoint prefix, our prefix), first match wins. The first four rows are the names that the
# published checkpoints (and transformers' save_pretrained) use; the last four are the in-memory
# names of transformers 5.x, found in files written straight from its state_dict().
WEIGHT_TABLE: tuple[tuple[str, str], ...] = (
    ("language_model.lm_head.", "text.lm_head."),
    ("language_model.model.", "text."),
    ("vision_model.", "vision."),
    ("multi_modal_projector.", "projector."),
    ("lm_head.", "text.lm_head."),
    ("model.language_model.", "text."),
    ("model.vision_model.", "vision."),
    ("model.multi_modal_projector.", "projector."),
)


def computed_buffers(config: MllamaConfig) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (the rope frequencies): not in the checkpoint, rebuilt."""
    return {"text.rotary.inv_freq": rope_inv_freq(config.text.rope, config.text.head_dim)}


# Mllama's "checkpoint_format" part (graphs/mllama_family.py)
FORMAT = CheckpointFormat(
    table=WEIGHT_TABLE,
    published=4,
    model="the Llama 3.2 Vision model",
    buffers=computed_buffers,
    side_files=write_side_files,
    describe=describe,
)
our_name = FORMAT.our_name
checkpoint_name = FORMAT.checkpoint_name


def load_model(
    folder: str | Path,
    semantics: str = "meta",
    dtype: torch.dtype = torch.float32,
) -> MllamaModel:
    """Builds the model from a checkpoint folder: every tensor used, every shape checked."""
    folder = Path(folder)
    check_folder(folder)
    config = MllamaConfig.from_hf_config(folder)
    return load_family_model(folder, dtype, config=config, semantics=semantics)
