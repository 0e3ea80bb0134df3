"""The one-token decode graph as it was before the step graph took several new tokens, kept
verbatim (its forward and its attention, from graphs/model.py and graphs/layers.py of the
parent of the step-graph commit) so that tests can hold the step graph to it bit for bit and
export artifacts of the old contract."""

from __future__ import annotations

import math

import torch
from torch import nn

from mllama_export.graphs.contract import SELF_KV, VISION_OUTPUTS, _s
from mllama_export.graphs.layers import MASKED_SCORE
from mllama_export.graphs.model import MllamaModel, _layer_plan
from mllama_export.graphs.text import cross_attention_masks

LEGACY_DECODE_INPUTS = (
    _s("input_ids", "int64", "batch one", "the newest token of each sequence"),
    _s("position_ids", "int64", "batch one", "its rope position"),
    _s(
        "attention_mask",
        "int64",
        "batch past_sequence",
        "1 for cache slots holding a real token; 0 for padding and unused slots",
    ),
    _s(
        "past_key",
        "model",
        SELF_KV.format("past_sequence"),
        "self-attention key cache; may be a preallocated buffer longer than what is filled",
    ),
    _s("past_value", "model", SELF_KV.format("past_sequence"), "self-attention value cache"),
    _s(
        "cross_attention_mask",
        "int64",
        "batch one num_images tiles",
        "the tiles the new token may see (the last prompt row repeated)",
    ),
    VISION_OUTPUTS[0],
    VISION_OUTPUTS[1],
)
LEGACY_DECODE_OUTPUTS = (
    _s("logits", "float32", "batch one vocab", "next-token logits"),
    _s("new_key", "model", SELF_KV.format("one"), "the new token's keys, to write into the cache"),
    _s("new_value", "model", SELF_KV.format("one"), "the new token's values"),
)


def legacy_attention_step(q, past_k, past_v, past_allowed, k, v):
    # q: [B, H, 1, D]; past_k, past_v: [B, H_kv, T, D]; past_allowed: [B, T]; k, v: [B, H_kv, 1, D]
    b, h, _, d = q.shape
    h_kv = past_k.shape[1]
    qg = (q * (1.0 / math.sqrt(d))).reshape(b, h_kv, h // h_kv, d)
    past_scores = (qg @ past_k.transpose(-1, -2)).float()
    past_scores = past_scores.masked_fill(~past_allowed[:, None, None], MASKED_SCORE)
    new_score = (qg * k).sum(-1, keepdim=True).float()
    probs = torch.cat((past_scores, new_score), dim=-1).softmax(dim=-1).to(v.dtype)
    past_probs, new_prob = probs[..., :-1], probs[..., -1:]
    out = past_probs @ past_v + new_prob * v
    return out.view(b, h, 1, d)


def _legacy_step(layer, x, cos, sin, past_k, past_v, past_allowed):
    q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
    attn = legacy_attention_step(q, past_k, past_v, past_allowed, k, v)
    x = x + layer.self_attn.output(attn)
    return x + layer.mlp(layer.post_attention_layernorm(x)), k, v


class LegacyDecodeGraph(nn.Module):
    """One token per sequence against the cache; returns only the new token's K/V."""

    INPUTS = LEGACY_DECODE_INPUTS
    OUTPUTS = LEGACY_DECODE_OUTPUTS

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
    ):
        # input_ids, position_ids: [B, 1]; attention_mask: [B, T]
        # past_key, past_value: [L_s, B, H_kv, T, Dh]; cross_attention_mask: [B, 1, I, Ti]
        # cross_key, cross_value: [L_x, B, H_kv, N, Dh]
        # -> logits: [B, 1, V]; new_key, new_value: [L_s, B, H_kv, 1, Dh]
        past_allowed = attention_mask != 0
        x_allowed, row = cross_attention_masks(cross_attention_mask, self.num_patches)
        cos, sin = self.text.rotary(position_ids)
        x = self.text.embed_tokens(input_ids)
        keys, values = [], []
        for layer, is_cross, j in self.plan:
            if is_cross:
                x = layer(x, cross_key[j], cross_value[j], x_allowed, row)
            else:
                x, k, v = _legacy_step(layer, x, cos, sin, past_key[j], past_value[j], past_allowed)
                keys.append(k)
                values.append(v)
        return self.text.logits(x), torch.stack(keys), torch.stack(values)
