"""LLaVA's language model: one decoder definition for Llama 2 / Vicuna, Mistral and Yi.

The layers are the Mllama decoder's self-attention layers (graphs/text.py), which read only the
head geometry, sizes and norm epsilon of their config; what differs here is the rope scaling,
the tied lm_head and Mistral's sliding window.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, Rotary, rope_inv_freq
from .llama_layers import SelfAttentionLayer
from .llava_config import LlavaTextConfig

# The window of a model without one: longer than any sequence a graph will see.
NO_WINDOW = 2**31 - 1


def text_inv_freq(c: LlavaTextConfig) -> torch.Tensor:
    """Rope inverse frequencies [head_dim // 2]; linear scaling divides them by its factor."""
    if c.rope.kind == "linear":
        return rope_inv_freq(replace(c.rope, kind="default"), c.head_dim) / c.rope.factor
    return rope_inv_freq(c.rope, c.head_dim)


class LlavaRotary(Rotary):
    def __init__(self, c: LlavaTextConfig):
        super().__init__(replace(c.rope, kind="default"), c.head_dim)
        self.inv_freq = text_inv_freq(c)


def prefill_allowed(attention_mask: torch.Tensor, window: int) -> torch.Tensor:
    """Causal, padding and sliding-window mask of a prompt, over its slot indices.

    A query at slot i sees key slots j with i - window < j <= i, as transformers' sliding-window
    mask counts them (left padding included), and never a padding slot.
    """
    # attention_mask: [B, S] -> allowed: [B, 1, S, S] bool
    s = attention_mask.shape[1]
    slots = torch.arange(s, device=attention_mask.device)
    behind = slots[:, None] - slots[None, :]
    allowed = (behind >= 0) & (behind < window)
    return allowed & (attention_mask[:, None, None, :] != 0)


class LlavaDecoder(nn.Module):
    def __init__(self, c: LlavaTextConfig, tied_lm_head: bool):
        super().__init__()
        self.config = c
        self.window = c.sliding_window or NO_WINDOW
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(SelfAttentionLayer(c) for _ in range(c.num_layers))  # type: ignore[arg-type]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # A tied head has no tensor of its own: it reads the embedding.
        self.lm_head = None if tied_lm_head else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = LlavaRotary(c)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> [B, S, V] in float32, whatever the graph's precision
        return F.linear(self.norm(x), self.head_weight).float()
