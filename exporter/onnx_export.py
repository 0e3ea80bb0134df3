"""One graph module -> one ONNX file with external weights, named dims and a passing checker.

The config's family says the dims (its contract) and the example inputs traced
(exporter/family_build.py); `dims_for` and `example_inputs` are importable from here too."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch

from mllama_export.graphs.family import family_of
from mllama_export.graphs.quant import ONNX_TRANSLATIONS
from mllama_export.graphs.spec import TensorSpec, check_forward

from .family_build import dims_for, example_inputs
from .manifest import fault_point
from .options import BuildOptions
from .weightfile import (
    Source,
    WeightFile,
    bind_sources,
    fold_weight_transposes,
    tensor_sources,
)


def export_graph(
    graph: torch.nn.Module,
    config: Any,
    options: BuildOptions,
    path: Path,
    sources: Mapping[str, Source] | None = None,
    data: WeightFile | None = None,
) -> None:
    """Exports one graph module to ``path``, its weights in ``data`` (default: a new
    ``<name>.onnx.data`` beside it).

    ``sources`` (by the graph module's tensor paths; default: the graph's own tensors) produce
    the weights. A graph built on the meta device is traced without any weight in memory, and
    its weights are then written one tensor at a time (exporter/weightfile.py).
    """
    model = _trace(graph, config, options.with_defaults(config))
    if sources is None:
        sources = tensor_sources(graph)
    bind_sources(model, sources)
    fold_weight_transposes(model)
    # the exporter's own optimization (constant folding, dead code), which it could not run
    # while the weights had no values; folding stays below its size limit (a few KB)
    onnxscript.optimizer.optimize_ir(model)
    own = data is None
    data = data or WeightFile(path.with_name(f"{path.name}.data"))
    try:
        data.externalize(model, path.parent)
    finally:
        if own:
            data.__exit__()
    ir.save(model, path)
    fault_point(f"external-data:{path.stem}")
    _name_dims(path, graph.INPUTS + graph.OUTPUTS, config)
    onnx.checker.check_model(str(path))


def _trace(graph: torch.nn.Module, config: Any, options: BuildOptions) -> ir.Model:
    """torch.export (dynamo) to ONNX, unoptimized: on the meta device if the graph is."""
    # the inputs go in by position and are named after the contract: only a forward that
    # takes exactly the contract's inputs, in order, makes those names true
    check_forward(graph, graph.INPUTS)
    dims = dims_for(config, options)
    dynamic = family_of(config).part("contract").DYNAMIC_DIMS
    device = next(graph.parameters()).device
    args = tuple(a.to(device) for a in example_inputs(graph.INPUTS, config, options.dtype))
    shapes = {
        s.name: {i: dims[d] for i, d in s.dynamic_axes(dynamic).items()} for s in graph.INPUTS
    }
    # torch.onnx logs a warning per missing torchvision op, which this model never uses.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph.eval(),
            args,
            input_names=[s.name for s in graph.INPUTS],
            output_names=[s.name for s in graph.OUTPUTS],
            dynamic_shapes=shapes,
            # FP8 layers (graphs/quant.py) become standard QuantizeLinear/DequantizeLinear
            custom_translation_table=ONNX_TRANSLATIONS,
            opset_version=options.opset,
            dynamo=True,
            optimize=False,
            verbose=False,
        )
    return program.model


def _name_dims(path: Path, specs: tuple[TensorSpec, ...], config: Any) -> None:
    """The exporter names derived dims after their formula (`68*num_images`); the contract's
    names are what TensorRT profiles and users see, so they are written back."""
    model = onnx.load(str(path), load_external_data=False)
    by_name = {s.name: s for s in specs}
    contract = family_of(config).part("contract")
    static = contract.static_dims(config)
    for value in [*model.graph.input, *model.graph.output]:
        spec = by_name[value.name]
        for dim, name in zip(value.type.tensor_type.shape.dim, spec.dims, strict=True):
            if name in contract.DYNAMIC_DIMS:
                dim.dim_param = name
            else:
                dim.dim_value = static[name]
    onnx.save(model, str(path))
