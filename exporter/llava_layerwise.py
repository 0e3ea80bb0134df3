"""LLaVA's "layerwise" part: our PyTorch graphs over a checkpoint one layer at a time.

The units (read from the memory-mapped checkpoint only while they run, then dropped) are each
CLIP tower layer, the projector, the token embedding, each decoder layer and lm_head; the rest
(the patch and position embeddings, the norms, LLaVA-NeXT's newline vector) is read once. A
tied model's head reads the embedding, which then stays resident. exporter/layermajor.py runs
the jobs (re-exported here with ``Job`` and ``read_float``): each graph call reads each unit
once for every job, and the results equal those of the whole model in memory, bit for bit.

Peak memory: the largest unit (at 7B a float32 decoder layer, 0.81 GB, or the embedding or
lm_head, 0.52 GB; at 34B a layer, 2.23 GB, and the 64,000-token embedding, 1.84 GB), the
small tensors and the jobs' activations.
"""

from __future__ import annotations

import torch

from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_model import GRAPH_MODULES, LlavaModel
from mllama_export.graphs.llava_weights import computed_buffers

from .layermajor import Job, LayerMajor, LazyBase, read_float

__all__ = ["Job", "LayerMajor", "LazyModel", "read_float", "unit_prefixes"]


def unit_prefixes(config: LlavaConfig) -> list[str]:
    """The units, in the order the graphs run them."""
    untied = not config.tied_lm_head
    return [
        *(f"vision.encoder.layers.{i}" for i in range(config.vision_depth)),
        "projector",
        *(["text.embed_tokens"] if untied else []),
        *(f"text.layers.{i}" for i in range(config.text.num_layers)),
        *(["text.lm_head"] if untied else []),
    ]


class LazyModel(LazyBase):
    """A LlavaModel of ``checkpoint`` whose units are loaded on demand, its parameters in
    ``dtype`` (float32 by default; the rope frequencies stay float32)."""

    def __init__(self, checkpoint, dtype: torch.dtype = torch.float32):
        config = checkpoint.config
        with torch.device("meta"):
            model = LlavaModel(config)
        units, buffers = unit_prefixes(config), computed_buffers(config)
        super().__init__(checkpoint, model, units, buffers, GRAPH_MODULES, dtype)

    def entries(self) -> list[tuple[object, str, str]]:
        # the graphs call a decoder layer's prefill() and step(), and the head through
        # text.logits(), which reads lm_head's weight without calling the module
        text = self.model.text
        found = [
            (layer, method, f"text.layers.{i}")
            for i, layer in enumerate(text.layers)
            for method in ("prefill", "step")
        ]
        return found + ([] if text.lm_head is None else [(text, "logits", "text.lm_head")])
