"""The text decoder: Llama 3 self-attention layers with gated cross-attention layers between them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import TextConfig
from .layers import RMSNorm, Rotary, SwiGLU, grouped_attention
from .llama_layers import SelfAttentionLayer


def _zero_rows(attn: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return attn * row


def _keep_rows(attn: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return attn


class CrossAttentionLayer(nn.Module):
    """Text rows attend to the image tokens; both branches are tanh-gated.

    `row` marks text rows that see at least one image tile. Both semantics zero the MLP branch
    of the other rows; Meta's reference also zeroes their attention output (the layer is then
    the identity there), transformers 5.x lets them attend to every image token unmasked.
    """

    def __init__(self, c: TextConfig, semantics: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.gate_rows: Callable = _zero_rows if semantics == "meta" else _keep_rows

    def kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # states: [B, N, D] (projected image tokens) -> k, v: [B, H_kv, N, Dh]
        b, n, _ = states.shape
        k = self.k_proj(states).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v

    def forward(self, x, xk, xv, allowed, row):
        # x: [B, S, D]; xk, xv: [B, H_kv, N, Dh]; allowed: [B, 1, S, N]; row: [B, S, 1]
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2))
        attn = grouped_attention(q, xk, xv, allowed).transpose(1, 2).reshape(b, s, -1)
        return self.gate_rows(self.o_proj(attn), row)


class CrossAttentionDecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, semantics: str):
        super().__init__()
        self.cross_attn = CrossAttentionLayer(c, semantics)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, xk, xv, allowed, row):
        # x: [B, S, D]; xk, xv: [B, H_kv, N, Dh]; allowed: [B, 1, S, N]; row: [B, S, 1]
        attn = self.cross_attn(self.input_layernorm(x), xk, xv, allowed, row)
        x = x + self.cross_attn_attn_gate.tanh() * attn
        mlp = self.mlp(self.post_attention_layernorm(x)) * row
        return x + self.cross_attn_mlp_gate.tanh() * mlp


def cross_attention_masks(
    cross_attention_mask: torch.Tensor, num_patches: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile mask of the processor -> per-token boolean mask and the rows that see any image.

    Rows that see no image attend to every image token (their output is then discarded or
    zeroed by the semantics), which is what both references do.
    """
    # cross_attention_mask: [B, S, I, T] -> allowed: [B, 1, S, I*T*P] bool, row: [B, S, 1]
    b, s, i, t = cross_attention_mask.shape
    tiles = cross_attention_mask != 0
    sees = tiles[..., None].expand(b, s, i, t, num_patches).reshape(b, s, i * t * num_patches)
    # A sum rather than any(): it stays defined (zero) when there are no image tokens at all.
    row = sees.to(torch.int32).sum(-1, keepdim=True) > 0
    allowed = sees | ~row
    return allowed[:, None], row


class TextDecoder(nn.Module):
    def __init__(self, c: TextConfig, semantics: str = "meta"):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.embedding_rows, c.hidden_size)
        self.layers = nn.ModuleList(
            CrossAttentionDecoderLayer(c, semantics)
            if i in c.cross_attention_layers
            else SelfAttentionLayer(c)
            for i in range(c.num_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = Rotary(c.rope, c.head_dim)

    @property
    def self_layers(self) -> list[SelfAttentionLayer]:
        return [layer for layer in self.layers if isinstance(layer, SelfAttentionLayer)]

    @property
    def cross_layers(self) -> list[CrossAttentionDecoderLayer]:
        return [layer for layer in self.layers if isinstance(layer, CrossAttentionDecoderLayer)]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> [B, S, V] in float32, whatever the graph's precision
        return self.lm_head(self.norm(x)).float()
