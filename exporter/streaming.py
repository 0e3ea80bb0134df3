"""The graphs of a checkpoint (its family's), traced on the meta device, weights streamed to disk.

No weight is ever resident as a whole model: tracing sees meta tensors, and each weight is
read from the memory-mapped safetensors, cast (or FP8-quantized), written and dropped before
the next (exporter/weightfile.py). Graphs that name the same data file share it (Mllama's
prefill and decode: one text weight file).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch

from mllama_export.graphs.checkpoint import Checkpoint
from mllama_export.graphs.family import family_of
from mllama_export.graphs.progress import step
from mllama_export.graphs.quant import quantize_model

from .family_build import hook
from .manifest import fault_point
from .onnx_export import export_graph
from .options import BuildOptions
from .weightfile import WeightFile, checkpoint_sources, graph_names


class StreamingExport:
    """Exports graphs of ``checkpoint``'s model in ``options``' precision; ``input_amax``
    (FP8 only: calibrated max |input| per quantized linear) sets the FP8 layers."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        options: BuildOptions,
        input_amax: Mapping[str, float] | None = None,
    ):
        self.checkpoint = checkpoint
        self.options = options.with_defaults(checkpoint.config)
        self.family = family_of(checkpoint.config)
        model_options = hook(self.family, "model_options")(options)
        with torch.device("meta"):
            self.model = self.family.part("model")(checkpoint.config, **model_options)
            # casts the parameters only, as load_model does: RoPE's frequencies stay float32
            quantize_model(self.model, input_amax or {}, options.dtype, options.fp8_weights)
        self.sources = checkpoint_sources(checkpoint, self.model, options.dtype, input_amax)

    def export_all(self, folder: Path) -> dict[str, dict]:
        """All the family's graphs into ``folder``; returns, per graph, the weight bytes it
        wrote (none where an earlier graph wrote its data file's) and the seconds it took."""
        written, graphs = {}, self.family.graphs
        with ExitStack() as stack:
            files = {
                name: stack.enter_context(WeightFile(folder / name))
                for name in sorted({g.data_file for g in graphs.values()})
            }
            for name in graphs:
                fault_point(f"export:{name}")
                data = files[graphs[name].data_file]
                before, start = data.bytes_written, time.perf_counter()
                with step(f"exporting the {name} graph"):
                    self.export(name, folder / f"{name}.onnx", data)
                written[name] = {
                    "weight_bytes_written": data.bytes_written - before,
                    "export_s": round(time.perf_counter() - start, 2),
                }
                fault_point(f"exported:{name}")
        return written

    def export(self, name: str, path: Path, data: WeightFile) -> None:
        graph = self.family.part("graph_modules")[name](self.model)
        names = graph_names(graph, self.model)
        sources = {path_: self.sources[ours] for path_, ours in names.items()}
        export_graph(graph, self.checkpoint.config, self.options, path, sources, data)
