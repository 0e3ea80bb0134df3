"""Llama's self-attention decoder layer, for every family whose language model is Llama's:
Mllama's text decoder between its cross-attention layers, LLaVA's Llama, Mistral and Yi."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .layers import RMSNorm, SwiGLU, apply_rope, grouped_attention, grouped_attention_step


class DecoderWidths(Protocol):
    """What a layer reads of a family's text config."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float


class SelfAttention(nn.Module):
    def __init__(self, c: DecoderWidths):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # x: [B, S, D] -> q: [B, H, S, Dh]; k, v: [B, H_kv, S, Dh], rope applied to q and k
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        # attn: [B, H, S, Dh] -> [B, S, D]
        b, _, s, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(b, s, -1))


class SelfAttentionLayer(nn.Module):
    def __init__(self, c: DecoderWidths):
        super().__init__()
        self.self_attn = SelfAttention(c)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def prefill(self, x, cos, sin, allowed):
        # x: [B, S, D]; cos, sin: [B, 1, S, Dh]; allowed: [B, 1, S, S] -> x, k, v: [B, H_kv, S, Dh]
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        x = x + self.self_attn.output(grouped_attention(q, k, v, allowed))
        return x + self.mlp(self.post_attention_layernorm(x)), k, v

    def step(self, x, cos, sin, past_k, past_v, past_allowed, new_allowed=None):
        # x: [B, N, D]; past_k, past_v: [B, H_kv, T, Dh]; past_allowed: [B, T]
        # new_allowed: [B, N, N] or None (all real, causal)
        # -> x: [B, N, D]; k, v: [B, H_kv, N, Dh] (the new tokens')
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        attn = grouped_attention_step(q, past_k, past_v, past_allowed, k, v, new_allowed)
        x = x + self.self_attn.output(attn)
        return x + self.mlp(self.post_attention_layernorm(x)), k, v
