"""Building blocks shared by the vision and text towers, written for export."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .hf_config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]; statistics in float32 so that 16-bit graphs neither overflow nor drift
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with Llama 3's long-context rescaling when asked."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.kind != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class Rotary(nn.Module):
    """cos/sin computed from positions as real tensors: no complex dtypes, no table to ship."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [B, S] -> cos, sin: [B, 1, S, D] (float32)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, S, D]; cos, sin: [B, 1, S, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def select_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rows of x at `positions`, the same ones for every sequence of the batch: a Gather
    on the sequence axis, so what follows (norm, lm_head) runs on those rows only."""
    # x: [B, S, D]; positions: [P] int64 -> [B, P, D]
    return x.index_select(1, positions)


# What a masked score becomes: finite in float16, bfloat16 and float32 alike, so whichever type
# a builder computes the scores in, a fully masked row (a left-padded prompt position) keeps a
# finite maximum and averages instead of turning into NaN (exp(-inf - -inf)); and far enough
# below any real score (|q.k| / sqrt(d) is a few hundred at most) that exp() of it is 0.
MASKED_SCORE = float(torch.finfo(torch.float16).min)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Softmax attention with grouped KV heads, without repeating K/V per query head.

    Written in the form TensorRT documents for fusing attention built from primitive layers
    (docs/tensorrt.md, "Fused Attention"): q scaled before the first matmul, then
    matmul -> mask -> softmax -> matmul on 4-D tensors, the query heads of one KV head folded
    into its rows. The scores are float32 (softmax needs it); masked ones take MASKED_SCORE.
    allowed is a boolean mask broadcastable to [B, 1, S, T].
    """
    # q: [B, H, S, D]; k, v: [B, H_kv, T, D]; allowed: [B, 1, S, T]
    b, h, s, d = q.shape
    h_kv = k.shape[1]
    qg = (q * (1.0 / math.sqrt(d))).reshape(b, h_kv, (h // h_kv) * s, d)
    rows = allowed.repeat(1, 1, h // h_kv, 1)  # [B, 1, G*S, T]: query row g*S + i is row i
    scores = (qg @ k.transpose(-1, -2)).float().masked_fill(~rows, MASKED_SCORE)
    probs = scores.softmax(dim=-1).to(v.dtype)
    return (probs @ v).view(b, h, s, d)


def causal_allowed(attention_mask: torch.Tensor) -> torch.Tensor:
    """Which token may attend to which among tokens given together: the earlier and itself,
    real ones only (attention_mask 1). Shared by the prefill and the step graph."""
    # attention_mask: [B, S] -> [B, S, S] bool, row i = the query, column j = the key
    s = attention_mask.shape[1]
    positions = torch.arange(s, device=attention_mask.device)
    causal = positions[:, None] >= positions[None, :]
    return causal & (attention_mask[:, None, :] != 0)


def grouped_attention_step(
    q: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    past_allowed: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    new_allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """New tokens attending to the cache and to each other, without concatenating the cache.

    Only the scores are joined ([B, H_kv, G*N, T + N]); the past K/V are read in place. This is
    not the fusable pattern (the softmax spans two matmuls), so its scores are materialized:
    small when decoding (one query row per head), N x (T + N) per head for N new tokens.

    Each token's score against its own key is computed elementwise (a product and a sum over
    Dh), as the one-token decode step always computed its only new score, and a matmul gives
    the others: a matmul sums in another order, so one new token is the old decode step bit
    for bit. new_allowed None: every new token is real (causal among them), which is what
    callers that mask only the past pass (the LLaVA decode graph, one token per step).
    """
    # q: [B, H, N, D]; past_k, past_v: [B, H_kv, T, D]; past_allowed: [B, T]
    # k, v: [B, H_kv, N, D]; new_allowed: [B, N, N] (query i may see new key j)
    b, h, n, d = q.shape
    h_kv, t = past_k.shape[1], past_k.shape[2]
    g = h // h_kv
    qg = (q * (1.0 / math.sqrt(d))).reshape(b, h_kv, g * n, d)  # row g*N + i: head g, token i
    past_scores = (qg @ past_k.transpose(-1, -2)).float()
    past_scores = past_scores.masked_fill(~past_allowed[:, None, None], MASKED_SCORE)
    own = (qg * k.repeat(1, 1, g, 1)).sum(-1, keepdim=True)  # [B, H_kv, G*N, 1]
    positions = torch.arange(n, device=q.device)
    if new_allowed is None:
        new_allowed = (positions[:, None] >= positions[None, :])[None]
    diagonal = (positions[None, :] == positions[:, None]).repeat(g, 1)  # [G*N, N]
    new_scores = torch.where(diagonal, own, qg @ k.transpose(-1, -2)).float()
    new_scores = new_scores.masked_fill(~new_allowed.repeat(1, g, 1)[:, None], MASKED_SCORE)
    probs = torch.cat((past_scores, new_scores), dim=-1).softmax(dim=-1).to(v.dtype)
    out = probs[..., :t] @ past_v + probs[..., t:] @ v
    return out.view(b, h, n, d)
