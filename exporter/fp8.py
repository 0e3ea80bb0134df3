"""`--precision fp8`: calibrate layer by layer, build the quantized check model, check the graphs.

Explicit quantization as TensorRT recommends it for FP8: the ONNX graph itself holds
QuantizeLinear/DequantizeLinear (float8e4m3fn) around every quantized GEMM, the network is
built strongly typed (no precision flags; the graph's types are obeyed as written), and
every other op runs in float16. The same Q/DQ graph runs on ONNX Runtime (CPU included) with
graph optimization at BASIC: higher levels fuse Q/DQ + MatMul into integer-only kernels
that reject float8 inputs. The checks of the exported graphs are in exporter/fp8_check.py.

This module is Mllama's "fp8" part. What the build calls on it (exporter/buildplan.py,
exporter/build.py): ``fp8_layout(config, options) -> (layers, {graph: {initializer: layer}})``,
``calibration_cases(config, options, checkpoint_folder)``, ``quantize_fp8(checkpoint, options,
layers, cases) -> the manifest's quantization entry``, ``input_amax(quantization)``,
``check_fp8_graph(path, expected, scheme)``, ``load_quantized(checkpoint, options, amax)``,
``check_fp8_graphs(model, folder, options)`` and ``ORT_OPTIMIZATION``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.model import MllamaModel
from mllama_export.graphs.progress import step
from mllama_export.graphs.quant import (
    quantizable_linears,
    quantize_model,
)
from mllama_export.graphs.vision import VisionAttention
from mllama_export.graphs.weights import Checkpoint, computed_buffers

from .calibrate import CALIBRATION_STEPS, calibrate_streamed
from .fp8_cases import check_feeds
from .fp8_check import check_fp8_graph
from .fp8_common import (
    ORT_OPTIMIZATION,
    check_graphs,
    graph_weight_names,
    input_amax,
    load_quantized_model,
    meta_twin,
    onnx_weight_names,
    quantization_entry,
)
from .layerwise import chunked_vision_attention
from .mllama_build import mask_semantics
from .options import BuildOptions


def fp8_layers(config: MllamaConfig, options: BuildOptions) -> list[str]:
    """The layers ``options`` quantize, from a model on the meta device (no weights): a
    --fp8-exclude pattern that matches nothing is refused before any work starts."""
    return _fp8_layers(_meta_model(config, options), options)


def fp8_layout(
    config: MllamaConfig, options: BuildOptions
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The build plan's FP8 facts, from one model on the meta device: the layers ``options``
    quantize (fp8_layers) and, per graph, {FP8 initializer name: layer name} of those it runs
    (fp8_weight_names; an empty graph is an ordinary float16 one)."""
    model = _meta_model(config, options)
    names = _fp8_layers(model, options)
    with torch.device("meta"):
        quantize_model(model, dict.fromkeys(names, 1.0), options.dtype, options.fp8_weights)
    return names, fp8_weight_names(model, config, options.dtype)


def _meta_model(config: MllamaConfig, options: BuildOptions) -> MllamaModel:
    with torch.device("meta"):
        return MllamaModel(config, mask_semantics(options)).eval()


def _fp8_layers(model: MllamaModel, options: BuildOptions) -> list[str]:
    names = quantizable_linears(model, options.fp8_vision, options.fp8_exclude)
    if not names:
        raise MllamaExportError(
            f"--fp8-exclude {' '.join(options.fp8_exclude)} leaves no layer in FP8; build "
            "with --precision fp16 for that"
        )
    return names


def calibration_cases(config: MllamaConfig, options: BuildOptions, checkpoint: Path | None) -> list:
    """The user's calibration folder (prompts.jsonl, tokenized and preprocessed with the
    checkpoint's own tokenizer and preprocessor config), else the built-in evaluation set
    (which needs no ``checkpoint``)."""
    from mllama_export.engines.evalset import build_evalset, read_cases

    if options.calibration is None:
        return build_evalset(config, options.limits, CALIBRATION_STEPS)
    return read_cases(options.calibration, config, checkpoint)


def quantize_fp8(
    weights: Checkpoint,
    options: BuildOptions,
    names: Sequence[str],
    cases: Sequence,
) -> dict:
    """Calibrates the input scales of the FP8 layers ``names`` on the calibration ``cases``
    (both from the build plan), the float32 model run layer by layer from ``weights`` (never
    whole in memory). Returns the manifest's ``quantization`` entry; its ``layers`` hold each
    layer's calibrated input amax."""
    names, cases = list(names), list(cases)
    where = "built-in evaluation set" if options.calibration is None else str(options.calibration)
    with step(
        f"calibrating FP8 scales of {len(names)} linear layers on the {where} "
        f"({len(cases)} cases, float32, one layer at a time)"
    ):
        amax = calibrate_streamed(
            weights, mask_semantics(options), names, cases, options.limits, CALIBRATION_STEPS
        )
    builtin = "built-in evaluation set (engines/evalset.py build_evalset, seed 0)"
    return quantization_entry(names, amax, cases, options, builtin, CALIBRATION_STEPS)


def load_quantized(weights: Checkpoint, options: BuildOptions, amax: dict[str, float]):
    """`load_fp8_model` as the build's options ask for it."""
    return load_fp8_model(
        weights, mask_semantics(options), amax, options.dtype, options.fp8_weights
    )


def load_fp8_model(
    weights: Checkpoint,
    semantics: str,
    amax: dict[str, float],
    dtype: torch.dtype,
    scheme: str,
) -> MllamaModel:
    """The quantized model of ``weights`` as the artifacts hold it (FP8Linears with the
    calibrated ``amax``, everything else in ``dtype``), read tensor by tensor: FP8 weights
    are quantized from their float32 values, one at a time, never a float32 model."""
    with torch.device("meta"):
        model = MllamaModel(weights.config, semantics)
    buffers = computed_buffers(weights.config)
    return load_quantized_model(weights, model, amax, dtype, scheme, buffers)


def fp8_weight_names(model: nn.Module, config: MllamaConfig, dtype) -> dict[str, dict]:
    """{graph: {FP8 initializer name: layer name}} of every graph of a quantized ``model``
    (in memory, or on the meta device). The graphs run on example inputs on a meta twin of
    the model: at 11B a real forward of the traced sizes (two batch rows of two 4-tile
    images through the vision encoder) costs minutes and gigabytes, and only tells which
    layers run."""
    twin = model if next(model.parameters()).device.type == "meta" else _meta_twin(model)
    return graph_weight_names(twin, config, dtype)


def _meta_twin(model: MllamaModel) -> MllamaModel:
    return meta_twin(model, lambda: MllamaModel(model.config, model.semantics))


def check_fp8_graphs(model: MllamaModel, folder: Path, options: BuildOptions) -> dict[str, dict]:
    """Checks the three FP8 graphs in ``folder`` against ``model`` (load_fp8_model, the
    graphs' own weights): structure and values (check_fp8_graph), then the numbers on the
    inputs real prompts produce, every FP8 GEMM's output shared (check_fp8_numerics).
    Returns {graph: check entry} with the quantized layers of each."""
    config = model.config
    for module in model.vision.modules():
        if isinstance(module, VisionAttention):
            # 11B's 6,432-token tiles: attention in chunks of rows, never 8 GB of scores
            module.forward = functools.partial(chunked_vision_attention, module)
    feeds = check_feeds(model, options.limits, options.dtype)
    expected = fp8_weight_names(model, config, options.dtype)
    return check_graphs(model, folder, options, expected, feeds)


__all__ = [
    "ORT_OPTIMIZATION",
    "check_fp8_graph",
    "check_fp8_graphs",
    "fp8_layout",
    "fp8_weight_names",
    "input_amax",
    "load_fp8_model",
    "load_quantized",
    "onnx_weight_names",
    "quantize_fp8",
]
