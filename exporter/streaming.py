"""The three graphs of a checkpoint, traced on the meta device, weights streamed to disk.

No weight is ever resident as a whole model: tracing sees meta tensors, and each weight is
read from the memory-mapped safetensors, cast (or FP8-quantized), written and dropped before
the next (exporter/weightfile.py). The prefill and decode graphs share one text weight file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig, truncated
from mllama_export.graphs.model import DecodeGraph, MllamaModel, PrefillGraph, VisionGraph
from mllama_export.graphs.quant import quantize_model
from mllama_export.graphs.weights import Checkpoint

from .manifest import fault_point
from .onnx_export import export_graph
from .options import BuildOptions
from .plan import count_params
from .weightfile import WeightFile, checkpoint_sources, graph_names

GRAPHS = {"vision": VisionGraph, "prefill": PrefillGraph, "decode": DecodeGraph}
# prefill and decode hold the same text weights: one copy on disk, at the same offsets
DATA_FILES = {"vision": "vision.onnx.data", "prefill": "text.onnx.data", "decode": "text.onnx.data"}
# PyTorch's model, ONNX Runtime's copy of its weights, and its pre-packed GEMM weights
CHECK_COPIES = 3
CHECK_HEADROOM = 2 << 30


class StreamingExport:
    """Exports graphs of ``checkpoint``'s model in ``options``' precision; ``input_amax``
    (FP8 only: calibrated max |input| per quantized linear) sets the FP8 layers."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        options: BuildOptions,
        input_amax: Mapping[str, float] | None = None,
    ):
        self.checkpoint, self.options = checkpoint, options
        with torch.device("meta"):
            self.model = MllamaModel(checkpoint.config, options.xattn_mask)
            # casts the parameters only, as load_model does: RoPE's frequencies stay float32
            quantize_model(self.model, input_amax or {}, options.dtype, options.fp8_weights)
        self.sources = checkpoint_sources(checkpoint, self.model, options.dtype, input_amax)

    def export_all(self, folder: Path, progress=None) -> dict[str, dict]:
        """All three graphs into ``folder``; returns, per graph, the weight bytes it wrote
        (decode writes none: prefill wrote them) and the seconds it took."""
        written = {}
        with ExitStack() as stack:
            files = {
                name: stack.enter_context(WeightFile(folder / name))
                for name in sorted(set(DATA_FILES.values()))
            }
            for name in GRAPHS:
                if progress is not None:
                    progress(f"exporting the {name} graph")
                fault_point(f"export:{name}")
                data = files[DATA_FILES[name]]
                before, start = data.bytes_written, time.perf_counter()
                self.export(name, folder / f"{name}.onnx", data)
                written[name] = {
                    "weight_bytes_written": data.bytes_written - before,
                    "export_s": round(time.perf_counter() - start, 2),
                }
                fault_point(f"exported:{name}")
        return written

    def export(self, name: str, path: Path, data: WeightFile) -> None:
        graph = GRAPHS[name](self.model)
        names = graph_names(graph, self.model)
        sources = {path_: self.sources[ours] for path_, ours in names.items()}
        export_graph(graph, self.checkpoint.config, self.options, path, sources, data)


def check_depth(options: BuildOptions, config: MllamaConfig) -> str:
    """Where the check against PyTorch runs: "full" when the whole model fits in memory,
    else "reduced"; ``options.check_depth`` may ask for either. FP8 too: its calibration
    runs layer by layer whatever the depth (exporter/layerwise.py)."""
    if options.check_depth != "auto":
        return options.check_depth
    return "full" if memory_needed(options, config) <= available_memory() else "reduced"


def memory_needed(options: BuildOptions, config: MllamaConfig) -> int:
    # FP8's check model is float16 outside its FP8 layers: counted as float16, an upper bound
    return CHECK_COPIES * count_params(config).total * options.dtype.itemsize + CHECK_HEADROOM


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def reduced_config(config: MllamaConfig) -> MllamaConfig:
    """The first layers of the model, enough to hold every kind of layer: the self-attention
    layers up to the first cross-attention layer, that layer and one more self-attention
    layer; two local and one global vision layer."""
    first_cross = config.text.cross_attention_layers[0]
    return truncated(
        config,
        text_layers=min(config.text.num_layers, first_cross + 2),
        vision_layers=min(config.vision.num_layers, 2),
        global_layers=min(config.vision.num_global_layers, 1),
    )


def describe_reduced(small: MllamaConfig, full: MllamaConfig, options: BuildOptions) -> str:
    why = (
        "as --check-depth reduced asks"
        if options.check_depth == "reduced"
        else "the whole model does not fit in memory for the check"
    )
    return (
        f"reduced-depth copy: the first {small.text.num_layers} of {full.text.num_layers} text "
        f"layers, {small.vision.num_layers} of {full.vision.num_layers} local and "
        f"{small.vision.num_global_layers} of {full.vision.num_global_layers} global vision "
        f"layers, with the checkpoint's own weights ({why})"
    )


# What FP8 calibration holds besides the jobs' activations: the largest unit in float32 (at
# 11B the embedding or lm_head), the small tensors, the libraries (exporter/layerwise.py).
CALIBRATION_HEADROOM = 2 << 30


def calibration_memory(config: MllamaConfig) -> int:
    """Bytes FP8 calibration needs at least: the largest unit it loads, in float32, plus the
    headroom. Independent of depth: it runs one layer at a time."""
    t, v = config.text, config.vision
    embed = t.embedding_rows * t.hidden_size
    lm_head = t.vocab_size * t.hidden_size
    text_layer = (
        3 * t.hidden_size * t.intermediate_size
        + (2 * t.num_heads + 2 * t.num_kv_heads) * t.head_dim * t.hidden_size
    )
    vision_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    return 4 * max(embed, lm_head, text_layer, vision_layer) + CALIBRATION_HEADROOM


def refuse_fp8_calibration(options: BuildOptions, config: MllamaConfig) -> None:
    """FP8 calibration runs layer by layer, so what it needs does not grow with depth; it
    is refused up front only where even one layer (and the headroom) does not fit."""
    if options.precision != "fp8":
        return
    needed, available = calibration_memory(config), available_memory()
    if needed > available:
        raise MllamaExportError(
            f"--precision fp8 calibrates one layer at a time in float32, which needs "
            f"{needed / 1e9:.1f} GB (the largest layer and the libraries), and this machine "
            f"has {available / 1e9:.1f} GB available; build bf16 or fp16 here, or build fp8 "
            "on a machine with that much memory"
        )
