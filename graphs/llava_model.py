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
from .spec import check_forward


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
        check_forward(self, self.INPUTS)

    def forward(self, pixel_values):
        # pixel_values: [N, C, H, W] -> image_features: [N, P, D]
        # a tuple, as every graph returns its contract's outputs
        return (self.projector(self.vision(pixel_values)),)


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
        check_forward(self, self.INPUTS)

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
        check_forward(self, self.INPUTS)

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
