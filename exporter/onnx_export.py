"""One graph module -> one ONNX file with external weights, named dims and a passing checker."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch.export import Dim

from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.contract import DYNAMIC_DIMS, static_dims
from mllama_export.graphs.quant import ONNX_TRANSLATIONS
from mllama_export.graphs.spec import TensorSpec, check_forward

from .manifest import fault_point
from .options import BuildOptions
from .weightfile import (
    Source,
    WeightFile,
    bind_sources,
    fold_weight_transposes,
    tensor_sources,
)

# Sizes of the example inputs traced at export: all >= 2 and distinct, so that no dynamic dim
# is specialized to 0 or 1, or confused with another.
EXAMPLE_SIZES = {
    "batch": 2,
    "num_images": 2,
    "sequence": 7,
    "num_logits": 3,
    "past_sequence": 11,
    "new_tokens": 5,
}


def dims_for(config: MllamaConfig, options: BuildOptions) -> dict[str, Dim]:
    v = config.vision
    batch = Dim("batch", min=1, max=max(2, options.max_batch))
    images = Dim("num_images", min=1, max=max(2, options.max_images))
    return {
        "batch": batch,
        "num_images": images,
        "image_tokens": images * (v.max_num_tiles * v.num_patches),
        "sequence": Dim("sequence", min=1, max=max(8, options.max_seq_len)),
        "num_logits": Dim("num_logits", min=1, max=max(8, options.max_seq_len)),
        "past_sequence": Dim("past_sequence", min=1, max=max(12, options.max_seq_len)),
        "new_tokens": Dim("new_tokens", min=1, max=max(8, options.max_seq_len)),
        # past_sequence + new_tokens: the exporter derives it from the graph's own slicing
        "total_sequence": Dim("total_sequence", min=2, max=2 * max(12, options.max_seq_len)),
    }


def example_inputs(
    specs: tuple[TensorSpec, ...], config: MllamaConfig, dtype, sizes=None, seed: int = 0
) -> tuple:
    """Random inputs of the right shapes and dtypes; values only need to be valid."""
    sizes = {**static_dims(config), **(sizes or EXAMPLE_SIZES)}
    sizes["image_tokens"] = sizes["num_images"] * sizes["tiles"] * config.vision.num_patches
    sizes.setdefault("num_logits", 1)  # what serving asks for
    sizes.setdefault("new_tokens", 1)
    sizes["total_sequence"] = sizes.get("past_sequence", 1) + sizes["new_tokens"]
    # logit_positions index the prompt (prefill) or the new tokens (the decode step)
    positions = "new_tokens" if any("new_tokens" in s.dims for s in specs) else "sequence"
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        shape = spec.shape(sizes)
        if spec.dtype == "int64":
            high = {
                "input_ids": config.text.vocab_size,
                "position_ids": 64,
                "logit_positions": sizes.get(positions, 1),
                "aspect_ratio_ids": config.vision.max_aspect_ratio_id + 1,
            }.get(spec.name, 2)
            tensors.append(torch.randint(0, high, shape, generator=gen))
        else:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
    return tuple(tensors)


def export_graph(
    graph: torch.nn.Module,
    config: MllamaConfig,
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
    model = _trace(graph, config, options)
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


def _trace(graph: torch.nn.Module, config: MllamaConfig, options: BuildOptions) -> ir.Model:
    """torch.export (dynamo) to ONNX, unoptimized: on the meta device if the graph is."""
    # the inputs go in by position and are named after the contract: only a forward that
    # takes exactly the contract's inputs, in order, makes those names true
    check_forward(graph, graph.INPUTS)
    dims = dims_for(config, options)
    device = next(graph.parameters()).device
    args = tuple(a.to(device) for a in example_inputs(graph.INPUTS, config, options.dtype))
    shapes = {
        s.name: {i: dims[d] for i, d in s.dynamic_axes(DYNAMIC_DIMS).items()} for s in graph.INPUTS
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


def _name_dims(path: Path, specs: tuple[TensorSpec, ...], config: MllamaConfig) -> None:
    """The exporter names derived dims after their formula (`68*num_images`); the contract's
    names are what TensorRT profiles and users see, so they are written back."""
    model = onnx.load(str(path), load_external_data=False)
    by_name = {s.name: s for s in specs}
    static = static_dims(config)
    for value in [*model.graph.input, *model.graph.output]:
        spec = by_name[value.name]
        for dim, name in zip(value.type.tensor_type.shape.dim, spec.dims, strict=True):
            if name in DYNAMIC_DIMS:
                dim.dim_param = name
            else:
                dim.dim_value = static[name]
    onnx.save(model, str(path))
