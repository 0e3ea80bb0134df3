"""LLaVA as three exportable graphs: vision tiles, prompt prefill with the image splice, decode step."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import llava_contract as contract
from .llava_config import LlavaConfig
from .llava_text import LlavaDecoder, prefill_allowed
from .llava_vision import ClipVisionTower, Projector


class LlavaModel(nn.Module):
    """All weights, in the module tree that the weight table maps checkpoints onto."""

    # the Linears FP8 quantizes, by path prefix (graphs/quant.py quantizable_linears): the
    # decoder layers' q/k/v/o and MLPs (never the embedding or lm_head); with --fp8-vision the
    # CLIP tower's attention and MLPs and the projector too
    FP8_PREFIXES = ("text.layers.",)
    FP8_VISION_PREFIXES = ("vision.", "projector.")

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision = ClipVisionTower(config)
        self.projector = Projector(config)
        if config.is_next:
            self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))
        self.text = LlavaDecoder(config.text, config.tied_lm_head)


class LlavaVisionGraph(nn.Module):
    """Tiles in, projected features per tile out: any number of tiles, from any images."""

    SPEC = contract.GRAPHS["vision"]
    INPUTS, OUTPUTS = SPEC.inputs, SPEC.outputs

    def __init__(self, model: LlavaModel):
        super().__init__()
        self.vision, self.projector = model.vision, model.projector

    def forward(self, pixel_values):
        # pixel_values: [N, C, H, W] -> image_features: [N, P, D]
        return self.projector(self.vision(pixel_values))


def splice(
    embeds: torch.Tensor, features: torch.Tensor, layout: torch.Tensor, newline: torch.Tensor
) -> torch.Tensor:
    """Each position's embedding: its token's, or the feature (or newline) the layout names.

    The feature table gets the newline vector as one more row, which also makes it non-empty
    when a batch has no image, so that every gather index stays valid.
    """
    # embeds: [B, S, D]; features: [N, P, D]; layout: [B, S]; newline: [1, D] -> [B, S, D]
    flat = features.reshape(-1, embeds.shape[-1])
    table = torch.cat((flat, newline.to(flat.dtype)), dim=0)
    rows = torch.where(layout >= 0, layout, flat.shape[0])
    picked = F.embedding(rows, table)
    return torch.where((layout == contract.TEXT_TOKEN)[..., None], embeds, picked.to(embeds.dtype))


class LlavaPrefillGraph(nn.Module):
    """The prompt in, image features spliced in place of its image tokens; logits at the asked
    positions and the prompt's KV cache out."""

    SPEC = contract.GRAPHS["prefill"]
    INPUTS, OUTPUTS = SPEC.inputs, SPEC.outputs

    def __init__(self, model: LlavaModel):
        super().__init__()
        self.text = model.text
        # LLaVA 1.5 has no newline vector: its layouts never name one, the row is zeros
        self.newline_row: Callable[[torch.Tensor], torch.Tensor] = self._zero_row
        if model.config.is_next:
            self.image_newline = model.image_newline
            self.newline_row = self._learned_row

    def _zero_row(self, features: torch.Tensor) -> torch.Tensor:
        return features.new_zeros((1, features.shape[-1]))

    def _learned_row(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_newline[None]

    def forward(
        self, input_ids, position_ids, attention_mask, image_features, image_layout, logit_positions
    ):
        # input_ids, position_ids, attention_mask, image_layout: [B, S]; image_features: [N, P, D]
        # logit_positions: [K] -> logits: [B, K, V]; present_key, present_value: [L, B, H_kv, S, Dh]
        allowed = prefill_allowed(attention_mask, self.text.window)
        cos, sin = self.text.rotary(position_ids)
        embeds = self.text.embed_tokens(input_ids)
        x = splice(embeds, image_features, image_layout, self.newline_row(image_features))
        keys, values = [], []
        for layer in self.text.layers:
            x, k, v = layer.prefill(x, cos, sin, allowed)
            keys.append(k)
            values.append(v)
        logits = self.text.logits(x.index_select(1, logit_positions))
        return logits, torch.stack(keys), torch.stack(values)


class LlavaDecodeGraph(nn.Module):
    """One token per sequence against the cache; returns only the new token's K/V.

    The cache is read in place and never returned whole. The sliding window, when the model
    has one, is in `attention_mask`: the host knows the new token's slot, the graph cannot
    (the cache may be a preallocated buffer).
    """

    SPEC = contract.GRAPHS["decode"]
    INPUTS, OUTPUTS = SPEC.inputs, SPEC.outputs

    def __init__(self, model: LlavaModel):
        super().__init__()
        self.text = model.text

    def forward(self, input_ids, position_ids, attention_mask, past_key, past_value):
        # input_ids, position_ids: [B, 1]; attention_mask: [B, T]
        # past_key, past_value: [L, B, H_kv, T, Dh]
        # -> logits: [B, 1, V]; new_key, new_value: [L, B, H_kv, 1, Dh]
        past_allowed = attention_mask != 0
        cos, sin = self.text.rotary(position_ids)
        x = self.text.embed_tokens(input_ids)
        keys, values = [], []
        for j, layer in enumerate(self.text.layers):
            x, k, v = layer.step(x, cos, sin, past_key[j], past_value[j], past_allowed)
            keys.append(k)
            values.append(v)
        return self.text.logits(x), torch.stack(keys), torch.stack(values)


# Each registered graph's module, in the contract's order (the family's "graph_modules" part).
_MODULES = {cls.SPEC.name: cls for cls in (LlavaVisionGraph, LlavaPrefillGraph, LlavaDecodeGraph)}
GRAPH_MODULES: dict[str, type[nn.Module]] = {name: _MODULES[name] for name in contract.GRAPHS}
GRAPH_CLASSES = GRAPH_MODULES

# Sizes of the example inputs traced at export: all >= 2 and distinct, so that no dynamic dim
# is specialized or confused with another.
EXAMPLE_SIZES = {"batch": 2, "num_tiles": 3, "sequence": 7, "past_sequence": 11, "num_logits": 5}


def example_inputs(
    graph: nn.Module, config: LlavaConfig, dtype: torch.dtype, sizes=None, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right shapes, dtypes and value ranges for one graph."""
    sizes = {**contract.llava_static_dims(config), **(sizes or EXAMPLE_SIZES)}
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
    for spec in graph.INPUTS:
        shape = spec.shape(sizes)
        if spec.dtype == "int64":
            low, high = low_high[spec.name]
            tensors.append(torch.randint(low, high, shape, generator=gen))
        else:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
    return tuple(tensors)


def export_dims(config: LlavaConfig, max_batch: int = 8, max_tiles: int = 64, max_seq: int = 4096):
    """torch.export dims for the dynamic axes of every graph."""
    from torch.export import Dim

    return {
        "batch": Dim("batch", min=1, max=max(2, max_batch)),
        "num_tiles": Dim("num_tiles", min=1, max=max(3, max_tiles)),
        "sequence": Dim("sequence", min=1, max=max(8, max_seq)),
        "past_sequence": Dim("past_sequence", min=1, max=max(12, max_seq)),
        "num_logits": Dim("num_logits", min=1, max=max(8, max_seq)),
    }
