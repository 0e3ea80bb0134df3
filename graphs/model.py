"""The whole model as three exportable graphs: vision, prefill and decode step."""

from __future__ import annotations

import torch
from torch import nn

from mllama_export.errors import MllamaExportError

from . import contract
from .choices import MASK_SEMANTICS
from .config import MllamaConfig
from .layers import causal_allowed, select_positions
from .text import TextDecoder, cross_attention_masks
from .vision import VisionEncoder


class MllamaModel(nn.Module):
    """All weights, in the module tree that the weight table maps checkpoints onto."""

    # the Linears FP8 quantizes, by path prefix (graphs/quant.py quantizable_linears): the
    # text decoder's (self- and cross-attention, MLPs); with --fp8-vision the vision
    # encoder's and the projector too
    FP8_PREFIXES = ("text.layers.",)
    FP8_VISION_PREFIXES = ("vision.", "projector")

    def __init__(self, config: MllamaConfig, semantics: str = "meta"):
        super().__init__()
        if semantics not in MASK_SEMANTICS:
            raise MllamaExportError(
                f"unknown mask semantics {semantics!r}; expected one of {MASK_SEMANTICS}"
            )
        self.config, self.semantics = config, semantics
        self.vision = VisionEncoder(config.vision, tap_outputs=semantics == "hf")
        self.projector = nn.Linear(config.vision.output_dim, config.text.hidden_size)
        self.text = TextDecoder(config.text, semantics)


class VisionGraph(nn.Module):
    """Images in, the cross-attention K/V of every cross-attention layer out, once per image set."""

    SPEC = contract.GRAPHS["vision"]
    INPUTS, OUTPUTS = SPEC.inputs, SPEC.outputs

    def __init__(self, model: MllamaModel):
        super().__init__()
        self.vision, self.projector = model.vision, model.projector
        self.cross_layers = nn.ModuleList(layer.cross_attn for layer in model.text.cross_layers)

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        # pixel_values: [B, I, T, C, H, W]; aspect_ratio_ids: [B, I]; aspect_ratio_mask: [B, I, T]
        # -> cross_key, cross_value: [L_x, B, H_kv, I*T*P, Dh]
        b, i = aspect_ratio_ids.shape
        features = self.vision(
            pixel_values.flatten(0, 1), aspect_ratio_ids.flatten(), aspect_ratio_mask.flatten(0, 1)
        )
        states = self.projector(features.reshape(b, -1, features.shape[-1]))
        kv = [layer.kv(states) for layer in self.cross_layers]
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


def _layer_plan(text: TextDecoder) -> list[tuple[nn.Module, bool, int]]:
    """(layer, is_cross, index into the stacked cross or self caches), in depth order."""
    plan, n_cross, n_self = [], 0, 0
    for layer in text.layers:
        is_cross = layer in text.cross_layers
        plan.append((layer, is_cross, n_cross if is_cross else n_self))
        n_cross, n_self = n_cross + is_cross, n_self + (not is_cross)
    return plan


class PrefillGraph(nn.Module):
    """The prompt in; logits at the asked positions and the prompt's self-attention KV cache out.

    Serving asks for the last position only, so the lm_head (the largest GEMM of a prefill:
    128256 rows) runs on one row per sequence and the output is [B, 1, V] instead of
    [B, S, V] (16.8 GB in float32 at batch 4, 8192 tokens); the gate asks for every position.
    """

    SPEC = contract.GRAPHS["prefill"]
    INPUTS, OUTPUTS = SPEC.inputs, SPEC.outputs

    def __init__(self, model: MllamaModel):
        super().__init__()
        self.text, self.num_patches = model.text, model.config.vision.num_patches
        self.plan = _layer_plan(model.text)

    def forward(
        self,
        input_ids,
        position_ids,
        attention_mask,
        cross_attention_mask,
        cross_key,
        cross_value,
        logit_positions,
    ):
        # input_ids, position_ids, attention_mask: [B, S]; cross_attention_mask: [B, S, I, T]
        # cross_key, cross_value: [L_x, B, H_kv, N, Dh]; logit_positions: [P]
        # -> logits: [B, P, V]; present_key, present_value: [L_s, B, H_kv, S, Dh]
        allowed = causal_allowed(attention_mask)[:, None]
        x_allowed, row = cross_attention_masks(cross_attention_mask, self.num_patches)
        cos, sin = self.text.rotary(position_ids)
        x = self.text.embed_tokens(input_ids)
        keys, values = [], []
        for layer, is_cross, j in self.plan:
            if is_cross:
                x = layer(x, cross_key[j], cross_value[j], x_allowed, row)
            else:
                x, k, v = layer.prefill(x, cos, sin, allowed)
                keys.append(k)
                values.append(v)
        logits = self.text.logits(select_positions(x, logit_positions))
        return logits, torch.stack(keys), torch.stack(values)


class DecodeGraph(nn.Module):
    """The step graph: new tokens against the cache; returns only the new tokens' K/V.

    One new token per sequence is a decode step (bit for bit the one-token decode graph of
    earlier versions); several are a chunk of a prompt (chunked prefill) or a whole prompt
    against a one-slot masked past (a shared text engine's prefill). The new tokens attend to
    the filled cache slots and causally to each other. The cache is read in place and never
    returned whole, so a runner that keeps it in a preallocated buffer writes the new slots
    instead of copying the past. Logits are computed at `logit_positions` only, as prefill's.
    """

    SPEC = contract.GRAPHS["decode"]
    INPUTS, OUTPUTS = SPEC.inputs, SPEC.outputs

    def __init__(self, model: MllamaModel):
        super().__init__()
        self.text, self.num_patches = model.text, model.config.vision.num_patches
        self.plan = _layer_plan(model.text)

    def forward(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key,
        past_value,
        cross_attention_mask,
        cross_key,
        cross_value,
        logit_positions,
    ):
        # input_ids, position_ids: [B, N]; attention_mask: [B, T + N] (cache slots, then the
        # new tokens); past_key, past_value: [L_s, B, H_kv, T, Dh]
        # cross_attention_mask: [B, N, I, Ti]; cross_key, cross_value: [L_x, B, H_kv, Nx, Dh]
        # logit_positions: [P] -> logits: [B, P, V]; new_key, new_value: [L_s, B, H_kv, N, Dh]
        t = past_key.shape[3]
        past_allowed = attention_mask[:, :t] != 0
        new_allowed = causal_allowed(attention_mask[:, t:])
        x_allowed, row = cross_attention_masks(cross_attention_mask, self.num_patches)
        cos, sin = self.text.rotary(position_ids)
        x = self.text.embed_tokens(input_ids)
        keys, values = [], []
        for layer, is_cross, j in self.plan:
            if is_cross:
                x = layer(x, cross_key[j], cross_value[j], x_allowed, row)
            else:
                x, k, v = layer.step(
                    x, cos, sin, past_key[j], past_value[j], past_allowed, new_allowed
                )
                keys.append(k)
                values.append(v)
        logits = self.text.logits(select_positions(x, logit_positions))
        return logits, torch.stack(keys), torch.stack(values)


# Each registered graph's module, in the registry's order (a KeyError names one without).
_MODULES = {cls.SPEC.name: cls for cls in (VisionGraph, PrefillGraph, DecodeGraph)}
GRAPH_MODULES: dict[str, type[nn.Module]] = {name: _MODULES[name] for name in contract.GRAPHS}
