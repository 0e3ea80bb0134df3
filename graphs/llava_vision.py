"""LLaVA's image side, written for export: the CLIP vision tower and the two-layer projector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .llava_config import ClipVisionConfig, LlavaConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
}


class ClipAttention(nn.Module):
    def __init__(self, c: ClipVisionConfig):
        super().__init__()
        self.heads, self.head_dim = c.num_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, L, D]; every token of a tile sees every other: no mask
        n, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
        out = scores.softmax(dim=-1).to(v.dtype) @ v
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class ClipMLP(nn.Module):
    def __init__(self, c: ClipVisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    """Pre-layernorm transformer block."""

    def __init__(self, c: ClipVisionConfig):
        super().__init__()
        self.self_attn = ClipAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = ClipMLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, L, D]
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, c: ClipVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(
            c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(c.num_positions, c.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, C, H, W] -> [N, 1 + patches, D], the class token first
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embedding.weight


class ClipEncoder(nn.Module):
    def __init__(self, c: ClipVisionConfig, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(c) for _ in range(depth))


class ClipVisionTower(nn.Module):
    """Tiles in, the hidden states of the feature layers out, concatenated feature-wise.

    Only the layers up to the deepest feature layer are built: the rest of a checkpoint's tower
    (and its post-layernorm) never influences a LLaVA output.
    """

    def __init__(self, config: LlavaConfig):
        super().__init__()
        c = config.vision
        self.feature_layers = config.feature_layers
        # "default" drops the class token: features start after it
        self.first = int(config.vision_feature_select_strategy == "default")
        self.embeddings = ClipEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = ClipEncoder(c, config.vision_depth)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, C, H, W] -> [N, P, D * len(feature_layers)]; P drops the class token
        # under "default"
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return torch.cat([states[i][:, self.first :] for i in self.feature_layers], dim=-1)


class Projector(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        bias, hidden = config.multimodal_projector_bias, config.text.hidden_size
        self.linear_1 = nn.Linear(config.feature_dim, hidden, bias=bias)
        self.act = ACTIVATIONS[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features: [N, P, F] -> [N, P, D_text]
        return self.linear_2(self.act(self.linear_1(features)))
