"""Our PyTorch graphs run over a checkpoint one layer at a time: the model is never whole in memory.

A :class:`LazyModel` is an MllamaModel whose small tensors are read once (float32) and whose
large ones are grouped in *units* (each vision layer, the token embedding, each text decoder
layer, lm_head): a unit is read from the memory-mapped checkpoint only while it runs, then
dropped. exporter/layermajor.py's :class:`LayerMajor` runs jobs over it (re-exported here
with ``Job`` and ``read_float``, this family's "layerwise" part): each graph call reads each
unit once for all the jobs, and the results equal those of the whole model, bit for bit.

Peak memory: the largest unit (at 11B the float32 embedding or lm_head, 2.1 GB; a decoder
layer is 0.87 GB), the small tensors (0.45 GB at 11B) and the jobs' activations.
"""

from __future__ import annotations

import functools

import torch

from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.layers import grouped_attention
from mllama_export.graphs.model import GRAPH_MODULES, MllamaModel
from mllama_export.graphs.vision import VisionAttention
from mllama_export.graphs.weights import Checkpoint, computed_buffers

from .layermajor import Job, LayerMajor, LazyBase, read_float

__all__ = [
    "ATTENTION_BUDGET",
    "Job",
    "LayerMajor",
    "LazyModel",
    "chunked_vision_attention",
    "read_float",
]

# Above this many bytes of attention scores (float32, three live copies), the vision encoder's
# attention runs in chunks of query rows: 11B's 6,432-token tiles would need 8 GB per image.
# Never reached on tiny, so there the computation is exactly the graph's.
ATTENTION_BUDGET = 1 << 30


def unit_prefixes(config: MllamaConfig) -> list[str]:
    """The units, in the order every graph runs them."""
    v, t = config.vision, config.text
    return [
        *(f"vision.transformer.layers.{i}" for i in range(v.num_layers)),
        *(f"vision.global_transformer.layers.{i}" for i in range(v.num_global_layers)),
        "text.embed_tokens",
        *(f"text.layers.{i}" for i in range(t.num_layers)),
        "text.lm_head",
    ]


class LazyModel(LazyBase):
    """An MllamaModel of ``checkpoint`` whose units are loaded on demand, its parameters in
    ``dtype`` (float32 by default; the rope frequencies stay float32, as load_model does)."""

    def __init__(
        self, checkpoint: Checkpoint, semantics: str = "meta", dtype: torch.dtype = torch.float32
    ):
        config = checkpoint.config
        with torch.device("meta"):
            model = MllamaModel(config, semantics)
        buffers = computed_buffers(config)
        super().__init__(checkpoint, model, unit_prefixes(config), buffers, GRAPH_MODULES, dtype)
        for module in self.model.vision.modules():
            if isinstance(module, VisionAttention):
                module.forward = functools.partial(chunked_vision_attention, module)

    def entries(self) -> list[tuple[object, str, str]]:
        # a self-attention layer's prefill() and step(), and the cross-attention's kv() (the
        # vision graph's only use of the layer)
        found = []
        for i, layer in enumerate(self.model.text.layers):
            targets = [(layer, "prefill"), (layer, "step")]
            targets += [(layer.cross_attn, "kv")] if hasattr(layer, "cross_attn") else []
            found += [(o, m, f"text.layers.{i}") for o, m in targets if hasattr(o, m)]
        return found


def chunked_vision_attention(
    attn: VisionAttention, x: torch.Tensor, allowed: torch.Tensor, budget: int = ATTENTION_BUDGET
) -> torch.Tensor:
    """VisionAttention.forward itself while its scores fit ``budget``; else the same
    attention one image and a block of query rows at a time (equal up to float rounding)."""
    # x: [N, L, D]; allowed: [N, 1, L, L]
    n, length, dim = x.shape
    rows = max(1, budget // (12 * attn.num_heads * length))  # float32 scores, 3 live copies
    if n * length <= rows:
        return VisionAttention.forward(attn, x, allowed)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, length, attn.num_heads, -1).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    out = torch.empty_like(q)
    for i in range(n):
        for start in range(0, length, rows):
            part = slice(start, start + rows)
            out[i : i + 1, :, part] = grouped_attention(
                q[i : i + 1, :, part], k[i : i + 1], v[i : i + 1], allowed[i : i + 1, :, part]
            )
    return attn.o_proj(out.transpose(1, 2).reshape(n, length, dim))
