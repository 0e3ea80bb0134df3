"""The vision tower: tiled ViT with gated tile embeddings, a local and a global transformer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import grouped_attention


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x: [N, L, D]; allowed: [N, 1, L, L]
        n, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = grouped_attention(q, k, v, allowed)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, dim))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(c)
        self.mlp = VisionMLP(c)
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x: [N, L, D]; allowed: [N, 1, L, L]
        x = x + self.self_attn(self.input_layernorm(x), allowed)
        return x + self.mlp(self.post_attention_layernorm(x))


class GatedVisionLayer(VisionLayer):
    """The global transformer's layer: both branches scaled by learned tanh gates."""

    def __init__(self, c: VisionConfig):
        super().__init__(c)
        self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
        self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x: [N, L, D]; allowed: [N, 1, L, L]
        x = x + self.gate_attn.tanh() * self.self_attn(self.input_layernorm(x), allowed)
        return x + self.gate_ffn.tanh() * self.mlp(self.post_attention_layernorm(x))


class VisionTransformer(nn.Module):
    """A stack of layers; `taps` names the layers whose input (or output) is also returned."""

    def __init__(
        self,
        c: VisionConfig,
        num_layers: int,
        gated: bool,
        taps: tuple[int, ...] = (),
        tap_outputs=False,
    ):
        super().__init__()
        layer = GatedVisionLayer if gated else VisionLayer
        self.layers = nn.ModuleList(layer(c) for _ in range(num_layers))
        self.taps_before = () if tap_outputs else taps
        self.taps_after = taps if tap_outputs else ()

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # x: [N, L, D] -> x: [N, L, D], tapped: len(taps) x [N, L, D]
        tapped = []
        # a layer may be tapped more than once: a truncated copy clamps its taps to its depth
        for i, layer in enumerate(self.layers):
            tapped.extend([x] * self.taps_before.count(i))
            x = layer(x, allowed)
            tapped.extend([x] * self.taps_after.count(i))
        return x, tapped


class AspectRatioEmbedding(nn.Module):
    """One learned vector per tile for each supported aspect ratio, gated by tanh."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.tiles, self.dim = c.max_num_tiles, c.hidden_size
        self.embedding = nn.Embedding(c.max_aspect_ratio_id + 1, c.max_num_tiles * c.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: [N, T, L, D]; aspect_ratio_ids: [N]
        emb = self.embedding(aspect_ratio_ids).view(-1, self.tiles, 1, self.dim)
        return x + self.gate.tanh() * emb


class PositionEmbedding(nn.Module):
    """Per-patch position embedding blended by one gate with a per-aspect-ratio tile embedding."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.shape = (c.max_num_tiles, c.num_patches, c.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(c.num_patches, c.hidden_size))
        self.tile_embedding = nn.Embedding(
            c.max_aspect_ratio_id + 1, c.max_num_tiles * c.num_patches * c.hidden_size
        )

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: [N, T, P, D]; aspect_ratio_ids: [N]
        gate = self.gate.tanh()
        tile = self.tile_embedding(aspect_ratio_ids).view(-1, *self.shape)
        return x + (1 - gate) * self.embedding + gate * tile


def tile_attention_mask(aspect_ratio_mask: torch.Tensor, c: VisionConfig) -> torch.Tensor:
    """Which tokens of the tiled sequence may attend to which, as the reference computes it.

    The reference only masks pairs where both query and key are padding (a padded tile or a
    pad patch); a real token attends to padding too. That is reproduced, not fixed: the
    weights were trained with it.
    """
    # aspect_ratio_mask: [N, T] -> allowed: [N, 1, T * P_pad, T * P_pad]
    n, tiles = aspect_ratio_mask.shape
    real_patch = torch.arange(c.padded_patches, device=aspect_ratio_mask.device) < c.num_patches
    valid = (aspect_ratio_mask[:, :, None] != 0) & real_patch
    valid = valid.reshape(n, tiles * c.padded_patches)
    return (valid[:, :, None] | valid[:, None, :])[:, None]


class VisionEncoder(nn.Module):
    """Pixels of up to max_num_tiles tiles per image in, one feature per patch out."""

    def __init__(self, c: VisionConfig, tap_outputs: bool = False):
        super().__init__()
        self.config = c
        self.patch_embedding = nn.Conv2d(
            c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.gated_positional_embedding = PositionEmbedding(c)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(c)
        self.post_tile_positional_embedding = AspectRatioEmbedding(c)
        self.layernorm_pre = nn.LayerNorm(c.hidden_size)
        self.layernorm_post = nn.LayerNorm(c.hidden_size)
        # transformers 5.x taps a layer's output where Meta's reference taps its input.
        self.transformer = VisionTransformer(
            c, c.num_layers, gated=False, taps=c.intermediate_layers, tap_outputs=tap_outputs
        )
        self.global_transformer = VisionTransformer(c, c.num_global_layers, gated=True)

    def embed(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, T, C, H, W]; aspect_ratio_ids: [N] -> [N, T, P_pad, D]
        c = self.config
        n, tiles = pixel_values.shape[:2]
        x = self.patch_embedding(pixel_values.flatten(0, 1)).flatten(2).transpose(1, 2)
        x = self.pre_tile_positional_embedding(
            x.reshape(n, tiles, -1, c.hidden_size), aspect_ratio_ids
        )
        cls = self.class_embedding.expand(n, tiles, 1, c.hidden_size)
        x = self.gated_positional_embedding(torch.cat((cls, x), dim=2), aspect_ratio_ids)
        x = self.layernorm_pre(x)
        return F.pad(x, (0, 0, 0, c.padded_patches - c.num_patches))

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
    ) -> torch.Tensor:
        # pixel_values: [N, T, C, H, W]; aspect_ratio_ids: [N]; aspect_ratio_mask: [N, T]
        # -> features: [N, T, P, output_dim]
        c = self.config
        n, tiles = pixel_values.shape[:2]
        allowed = tile_attention_mask(aspect_ratio_mask, c)
        x = self.embed(pixel_values, aspect_ratio_ids).reshape(n, tiles * c.padded_patches, -1)
        x, tapped = self.transformer(x, allowed)
        x = self.layernorm_post(x).view(n, tiles, c.padded_patches, -1)
        x = self.post_tile_positional_embedding(x, aspect_ratio_ids)
        x, _ = self.global_transformer(x.view(n, tiles * c.padded_patches, -1), allowed)
        # The reference interleaves the taps feature by feature (stack on the last dim).
        taps = torch.stack(tapped, dim=-1).flatten(-2)
        features = torch.cat((x, taps), dim=-1).view(n, tiles, c.padded_patches, -1)
        return features[:, :, : c.num_patches]
