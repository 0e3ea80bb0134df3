"""LLaVA checkpoint tensors <-> our module tree, through one declarative table, loaded strictly.

The checks run on the safetensors headers alone: every tensor the graphs use must be there with
the shape the config implies, and every other tensor must be one a LLaVA checkpoint is known to
carry without using (CLIP's post-layernorm, tower layers past the deepest feature layer, the
lm_head of a tied model); anything else is refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mllama_export.errors import MllamaExportError

from .checkpoint import Checkpoint, StoredTensor, _check_tensor, _corrupt, check_folder, shard_files
from .llava_config import LlavaConfig
from .llava_model import LlavaModel
from .llava_text import text_inv_freq

# (checkpoint prefix, our prefix), first match wins. The first five rows are the names of the
# published llava-hf checkpoints; transformers 5.x save_pretrained drops CLIP's `vision_model.`
# (row six); the last five are its in-memory names, found in files written from state_dict().
LLAVA_WEIGHT_TABLE: tuple[tuple[str, str], ...] = (
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


def llava_our_name(checkpoint_name: str) -> str | None:
    for theirs, ours in LLAVA_WEIGHT_TABLE:
        if checkpoint_name.startswith(theirs):
            return ours + checkpoint_name[len(theirs) :]
    return None


def llava_checkpoint_name(name: str) -> str:
    """The name a published llava-hf checkpoint gives one of our tensors."""
    for theirs, ours in LLAVA_WEIGHT_TABLE[:PUBLISHED_ROWS]:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(name)


def used_shapes(config: LlavaConfig) -> dict[str, tuple[int, ...]]:
    """Our name -> shape of every tensor the graphs read."""
    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in LlavaModel(config).state_dict().items()}


def unused_shapes(config: LlavaConfig) -> dict[str, tuple[int, ...]]:
    """Tensors a transformers checkpoint of this config holds that no LLaVA output depends on."""
    v, t = config.vision, config.text
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
    if config.tied_lm_head:
        shapes["text.lm_head.weight"] = (t.vocab_size, t.hidden_size)
    return shapes


def stored_tensors(folder: Path) -> list[StoredTensor]:
    """Every tensor of a checkpoint folder, from the safetensors headers (nothing is read)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in shard_files(folder).items():
        by_file.setdefault(file, []).append(name)
    found = []
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise MllamaExportError(
                            f"the index puts {name} in {file.name}, which lacks it"
                        )
                    part = f.get_slice(name)
                    found.append(
                        StoredTensor(name, file, tuple(part.get_shape()), part.get_dtype())
                    )
        except (SafetensorError, OSError) as err:
            raise _corrupt(file, err) from err
    return found


class LlavaCheckpoint(Checkpoint):
    """A LLaVA checkpoint folder checked against its config from the headers alone, then read
    one tensor at a time (`read` and `blocks` as for Mllama: `tensors` holds the used ones)."""

    def __init__(self, folder: str | Path, config: LlavaConfig):
        # Checkpoint.__init__ checks against the Mllama module tree; only its readers are shared
        self.folder, self.config = Path(folder), config
        used, unused = used_shapes(config), unused_shapes(config)
        stored = stored_tensors(self.folder)
        _refuse_original_names(self.folder, stored)
        by_ours = {llava_our_name(s.name) or f"?{s.name}": s for s in stored}
        unknown = sorted(
            s.name for ours, s in by_ours.items() if ours not in used and ours not in unused
        )
        missing = sorted(llava_checkpoint_name(n) for n in used.keys() - by_ours.keys())
        if unknown or missing or len(by_ours) != len(stored):
            raise MllamaExportError(
                f"checkpoint {self.folder} does not match its config: {len(missing)} tensors "
                f"missing {missing[:5]}, {len(unknown)} unexpected {unknown[:5]}"
                f"{_duplicates(stored)}; expected exactly the tensors of the "
                f"{config.model_type} model its config.json describes"
            )
        for ours, stored_tensor in by_ours.items():
            _check_tensor(stored_tensor, {**unused, **used}[ours])
        self.tensors = {n: by_ours[n] for n in sorted(used)}


def _duplicates(stored: list[StoredTensor]) -> str:
    seen: dict[str, str] = {}
    twice = []
    for s in stored:
        ours = llava_our_name(s.name) or s.name
        if ours in seen:
            twice.append(f"{seen[ours]} and {s.name}")
        seen[ours] = s.name
    return f", {len(twice)} stored twice under two spellings {twice[:3]}" if twice else ""


def _refuse_original_names(folder: Path, stored: list[StoredTensor]) -> None:
    original = [s.name for s in stored if ORIGINAL_FORMAT.search(s.name)]
    if original:
        raise MllamaExportError(
            f"{folder} holds the original LLaVA repository's weights ({original[0]}, ...); "
            "convert them with transformers' src/transformers/models/llava/"
            "convert_llava_weights_to_hf.py (or llava_next/convert_llava_next_weights_to_hf.py)"
        )


def load_llava_model(
    folder: str | Path, dtype: torch.dtype = torch.float32, config: LlavaConfig | None = None
) -> LlavaModel:
    """Builds the model from a checkpoint folder: every tensor used, every shape checked."""
    folder = Path(folder)
    check_folder(folder)
    checkpoint = LlavaCheckpoint(folder, config or LlavaConfig.from_hf_config(folder))
    with torch.device("meta"):
        model = LlavaModel(checkpoint.config)
    state = {name: checkpoint.read(name).to(dtype) for name in checkpoint.tensors}
    model.load_state_dict(state, assign=True, strict=True)
    for name, tensor in llava_computed_buffers(checkpoint.config).items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, tensor)
    return model.eval()


def llava_computed_buffers(config: LlavaConfig) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (the rope frequencies): not in the checkpoint, rebuilt."""
    return {"text.rotary.inv_freq": text_inv_freq(config.text)}
