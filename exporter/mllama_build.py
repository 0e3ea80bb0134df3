"""Mllama's "build" part: what the build asks of the family besides its graphs and weights.

The part's API (exporter/family_build.py holds the default of each, for a family without it):
``EXAMPLE_SIZES``, ``dims_for(config, options)`` (torch.export dims of every named dynamic
dim), ``example_inputs(specs, config, dtype, sizes, seed)`` (valid random inputs),
``model_options(options)`` (keyword arguments of the family's model), ``manifest_model(options)``
(the family's fields of the manifest's "model" entry), ``manifest_model_options(manifest)`` (the
model's keyword arguments, read back from a manifest: what the gate rebuilds) and ``option_problems(options, config)``
(what the build options ask that this model cannot do).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import Dim

from mllama_export.graphs.choices import DEFAULT_MASK
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.contract import static_dims
from mllama_export.graphs.spec import TensorSpec

# Sizes of the example inputs traced at export: all >= 2 and distinct, so that no dynamic dim
# is specialized to 0 or 1, or confused with another.
EXAMPLE_SIZES = {
    "batch": 2,
    "num_images": 2,
    "sequence": 7,
    "num_logits": 3,
    "past_sequence": 11,
    "new_tokens": 5,
}


def dims_for(config: MllamaConfig, options) -> dict[str, Dim]:
    v = config.vision
    batch = Dim("batch", min=1, max=max(2, options.max_batch))
    images = Dim("num_images", min=1, max=max(2, options.max_images))
    return {
        "batch": batch,
        "num_images": images,
        "image_tokens": images * (v.max_num_tiles * v.num_patches),
        "sequence": Dim("sequence", min=1, max=max(8, options.max_seq_len)),
        "num_logits": Dim("num_logits", min=1, max=max(8, options.max_seq_len)),
        "past_sequence": Dim("past_sequence", min=1, max=max(12, options.max_seq_len)),
        "new_tokens": Dim("new_tokens", min=1, max=max(8, options.max_seq_len)),
        # past_sequence + new_tokens: the exporter derives it from the graph's own slicing
        "total_sequence": Dim("total_sequence", min=2, max=2 * max(12, options.max_seq_len)),
    }


def example_inputs(
    specs: tuple[TensorSpec, ...], config: MllamaConfig, dtype, sizes=None, seed: int = 0
) -> tuple:
    """Random inputs of the right shapes and dtypes; values only need to be valid."""
    sizes = {**static_dims(config), **(sizes or EXAMPLE_SIZES)}
    sizes["image_tokens"] = sizes["num_images"] * sizes["tiles"] * config.vision.num_patches
    sizes.setdefault("num_logits", 1)  # what serving asks for
    sizes.setdefault("new_tokens", 1)
    sizes["total_sequence"] = sizes.get("past_sequence", 1) + sizes["new_tokens"]
    # logit_positions index the prompt (prefill) or the new tokens (the decode step)
    positions = "new_tokens" if any("new_tokens" in s.dims for s in specs) else "sequence"
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        shape = spec.shape(sizes)
        if spec.dtype == "int64":
            high = {
                "input_ids": config.text.vocab_size,
                "position_ids": 64,
                "logit_positions": sizes.get(positions, 1),
                "aspect_ratio_ids": config.vision.max_aspect_ratio_id + 1,
            }.get(spec.name, 2)
            tensors.append(torch.randint(0, high, shape, generator=gen))
        else:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
    return tuple(tensors)


def mask_semantics(options) -> str:
    """--xattn-mask picks the cross-attention mask semantics of the model traced and checked."""
    return options.xattn_mask or DEFAULT_MASK


def model_options(options) -> dict[str, Any]:
    return {"semantics": mask_semantics(options)}


def manifest_model(options) -> dict[str, Any]:
    semantics = mask_semantics(options)
    return {
        "xattn_mask": semantics,
        "vision_tap": "layer output" if semantics == "hf" else "layer input",
    }


def manifest_model_options(manifest: dict) -> dict[str, Any]:
    """The mask semantics the artifacts were built with (older manifests: Meta's)."""
    return {"semantics": manifest["model"].get("xattn_mask") or DEFAULT_MASK}


def option_problems(options, config: MllamaConfig) -> list[str]:
    if options.max_seq_len > config.text.max_position_embeddings:
        return [
            f"max-seq-len {options.max_seq_len} beyond the model's "
            f"{config.text.max_position_embeddings} positions"
        ]
    return []
