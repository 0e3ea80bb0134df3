"""LLaVA's "build" part: what the build asks of the family besides its graphs and weights (the
part's API: exporter/mllama_build.py's docstring; the defaults: exporter/family_build.py).

The traced dims bound the tiles of a batch by what its images can take: one tile per LLaVA 1.5
image, the base view plus the largest pinpoint's grid per LLaVA-NeXT image.
"""

from __future__ import annotations

import torch
from torch.export import Dim

from mllama_export.graphs import llava_contract as contract
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_layout import image_tiles, image_token_count
from mllama_export.graphs.spec import TensorSpec

# Sizes of the example inputs traced at export: all >= 2 and distinct, so that no dynamic dim
# is specialized or confused with another.
EXAMPLE_SIZES = {"batch": 2, "num_tiles": 3, "sequence": 7, "past_sequence": 11, "num_logits": 5}


def tiles_per_image(config: LlavaConfig) -> int:
    """The most tiles one image takes: LLaVA-NeXT's largest pinpoint grid plus the base view."""
    sizes = config.image_grid_pinpoints or ((config.vision.image_size,) * 2,)
    return max(image_tiles(config, size) for size in sizes)


def image_tokens_per_image(config: LlavaConfig) -> int:
    """The most image tokens one image expands to (an image of a pinpoint's own shape is never
    unpadded)."""
    sizes = config.image_grid_pinpoints or ((config.vision.image_size,) * 2,)
    return max(image_token_count(config, size) for size in sizes)


def export_dims(
    config: LlavaConfig, max_batch: int = 8, max_tiles: int = 64, max_seq: int = 4096
) -> dict[str, Dim]:
    """torch.export dims for the dynamic axes of every graph."""
    return {
        "batch": Dim("batch", min=1, max=max(2, max_batch)),
        "num_tiles": Dim("num_tiles", min=1, max=max(3, max_tiles)),
        "sequence": Dim("sequence", min=1, max=max(8, max_seq)),
        "past_sequence": Dim("past_sequence", min=1, max=max(12, max_seq)),
        "num_logits": Dim("num_logits", min=1, max=max(8, max_seq)),
    }


def dims_for(config: LlavaConfig, options) -> dict[str, Dim]:
    tiles = options.max_batch * options.max_images * tiles_per_image(config)
    return export_dims(config, options.max_batch, tiles, options.max_seq_len)


def example_inputs(
    specs: tuple[TensorSpec, ...], config: LlavaConfig, dtype, sizes=None, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right shapes, dtypes and value ranges for one graph: the layout
    names features, the newline vector and text tokens alike."""
    sizes = {**contract.static_dims(config), **(sizes or EXAMPLE_SIZES)}
    gen = torch.Generator().manual_seed(seed)
    features = sizes["num_tiles"] * config.tile_tokens
    low_high = {
        "input_ids": (0, config.text.vocab_size),
        "position_ids": (0, 64),
        "attention_mask": (1, 2),
        "image_layout": (contract.NEWLINE_TOKEN, features),
        "logit_positions": (0, sizes["sequence"]),
    }
    tensors = []
    for spec in specs:
        shape = spec.shape(sizes)
        if spec.dtype == "int64":
            low, high = low_high[spec.name]
            tensors.append(torch.randint(low, high, shape, generator=gen))
        else:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
    return tuple(tensors)


def default_max_seq_len(config: LlavaConfig, max_images: int) -> int:
    """Room for --max-images of the largest images and 256 tokens of text, in steps of 512,
    within the model's positions: 512 for the tiny presets, 1536 for LLaVA 1.5 (576 tokens an
    image), 6144 for LLaVA-NeXT at 7B (up to 2928)."""
    need = max_images * image_tokens_per_image(config) + 256
    return min(-(-need // 512) * 512, config.text.max_position_embeddings)


def option_problems(options, config: LlavaConfig) -> list[str]:
    """--xattn-mask (no cross-attention here), positions past the model's, and a sequence
    that cannot hold one image's tokens."""
    problems = []
    if options.xattn_mask is not None:
        problems.append(
            f"xattn-mask {options.xattn_mask}: LLaVA has no cross-attention (its image "
            "features take the image tokens' places in the prompt); leave --xattn-mask out"
        )
    positions = config.text.max_position_embeddings
    if options.max_seq_len > positions:
        problems.append(
            f"max-seq-len {options.max_seq_len} beyond the model's {positions} positions"
        )
    tokens = image_tokens_per_image(config)
    if options.max_seq_len < tokens + 2:
        problems.append(
            f"max-seq-len {options.max_seq_len} cannot hold one image's {tokens} image tokens "
            f"with a prompt token and a new one: give at least --max-seq-len {tokens + 2}"
        )
    return problems
