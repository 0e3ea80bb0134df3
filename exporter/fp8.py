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
from mllama_export.graphs.model import GRAPH_MODULES, MllamaModel
from mllama_export.graphs.progress import step
from mllama_export.graphs.quant import (
    FP8Linear,
    quantizable_linears,
    quantize_model,
    replace_module,
    scale_from_amax,
)
from mllama_export.graphs.vision import VisionAttention
from mllama_export.graphs.weights import Checkpoint, computed_buffers

from .calibrate import CALIBRATION_STEPS, calibrate_streamed
from .fp8_cases import check_feeds
from .fp8_check import check_fp8_graph, check_fp8_numerics
from .layerwise import chunked_vision_attention, read_float
from .onnx_export import example_inputs
from .options import BuildOptions

# ONNX Runtime's graph optimization level the FP8 graphs need (engines/onnxrt.py)
ORT_OPTIMIZATION = "basic"


def onnx_weight_names(graph: nn.Module, model: nn.Module, args: tuple) -> dict[str, str]:
    """{ONNX initializer name of an FP8 weight: its layer's name in the model} for the FP8
    layers that ``graph`` runs on ``args`` (a graph module may hold layers it never calls:
    the vision graph holds the cross-attention layers for their k/v projections only). The
    exporter names initializers by their path in the graph module, which differs from the
    model's (the vision graph reaches the cross-attention layers as cross_layers.i)."""
    in_model = {id(m): name for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    called: set[int] = set()
    handles = [
        m.register_forward_pre_hook(lambda m, _: called.add(id(m)))
        for m in graph.modules()
        if isinstance(m, FP8Linear)
    ]
    try:
        with torch.inference_mode():
            graph(*args)
    finally:
        for handle in handles:
            handle.remove()
    return {
        f"{path}.weight": in_model[id(m)]
        for path, m in graph.named_modules()
        if isinstance(m, FP8Linear) and id(m) in called
    }


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
        return MllamaModel(config, options.xattn_mask).eval()


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
            weights, options.xattn_mask, names, cases, options.limits, CALIBRATION_STEPS
        )
    return _quantization_entry(names, amax, cases, options)


def input_amax(quantization: dict | None) -> dict[str, float]:
    """{layer: calibrated input amax} of a manifest's ``quantization`` entry."""
    layers = (quantization or {}).get("layers", {})
    return {name: float(layer["input_amax"]) for name, layer in layers.items()}


_WEIGHTS = {
    "per-tensor": "per tensor: scale = max |w| / 448, one scalar; stored as float8e4m3fn "
    "initializers [in, out] behind DequantizeLinear with no axis (the layout TensorRT's FP8 "
    "GEMM fusion recognizes)",
    "per-channel": "per output channel: scale = max |w| over the input dim / 448; stored as "
    "float8e4m3fn initializers [in, out] behind DequantizeLinear(axis=1)",
}


def _quantization_entry(names, amax, cases, options: BuildOptions) -> dict:
    layers = {
        name: {
            "input_amax": amax[name],
            "input_scale": float(scale_from_amax(torch.tensor(amax[name]), options.dtype)),
        }
        for name in names
    }
    if options.calibration is None:
        source = (
            "built-in evaluation set (engines/evalset.py build_evalset, seed 0); "
            "`mllama-export validate` judges the same cases by default"
        )
    else:
        source = f"user folder {options.calibration} (prompts.jsonl)"
    return {
        "format": "float8e4m3fn (E4M3, finite-only; max 448)",
        "scheme": "explicit QuantizeLinear/DequantizeLinear in the ONNX graphs; TensorRT "
        "builds them strongly typed, with no precision flags",
        "activations": "per tensor, static: scale = calibrated max |input| / 448",
        "weight_scheme": options.fp8_weights,
        "weights": _WEIGHTS[options.fp8_weights],
        "rounding": "round to nearest even, saturating to +-448",
        "unquantized_dtype": str(options.dtype).removeprefix("torch."),
        "vision_encoder": options.fp8_vision,
        "excluded": list(options.fp8_exclude),
        "onnxruntime_optimization": ORT_OPTIMIZATION,
        "calibration": {
            "set": source,
            "cases": [case.name for case in cases],
            "decode_steps": CALIBRATION_STEPS,
            "reference": "our PyTorch graphs, float32, run one layer at a time",
        },
        "layers": layers,
    }


def load_quantized(weights: Checkpoint, options: BuildOptions, amax: dict[str, float]):
    """`load_fp8_model` as the build's options ask for it."""
    return load_fp8_model(weights, options.xattn_mask, amax, options.dtype, options.fp8_weights)


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
    config = weights.config
    with torch.device("meta"):
        model = MllamaModel(config, semantics)
    fp8_params = {f"{name}.{p}" for name in amax for p in ("weight", "bias")}
    state = {
        name: read_float(weights, name, dtype)
        for name, _ in model.named_parameters()
        if name not in fp8_params
    }
    model.load_state_dict(state, assign=True, strict=False)
    for name, value in amax.items():
        replace_module(model, name, _fp8_layer(weights, name, model, value, dtype, scheme))
    for name, tensor in computed_buffers(config).items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, tensor)
    return model.eval()


def _fp8_layer(weights, name, model, amax: float, dtype, scheme) -> FP8Linear:
    meta = model.get_submodule(name)
    linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None)
    linear.weight = nn.Parameter(read_float(weights, f"{name}.weight", torch.float32))
    if meta.bias is not None:
        linear.bias = nn.Parameter(read_float(weights, f"{name}.bias", torch.float32))
    return FP8Linear(linear, amax, dtype, scheme)


def fp8_weight_names(model: nn.Module, config: MllamaConfig, dtype) -> dict[str, dict]:
    """{graph: {FP8 initializer name: layer name}} of every graph of a quantized ``model``
    (in memory, or on the meta device). The graphs run on example inputs on a meta twin of
    the model: at 11B a real forward of the traced sizes (two batch rows of two 4-tile
    images through the vision encoder) costs minutes and gigabytes, and only tells which
    layers run."""
    twin = model if next(model.parameters()).device.type == "meta" else _meta_twin(model)
    names = {}
    for graph, cls in GRAPH_MODULES.items():
        args = tuple(a.to("meta") for a in example_inputs(cls.INPUTS, config, dtype))
        names[graph] = onnx_weight_names(cls(twin), twin, args)
    return names


def _meta_twin(model: MllamaModel) -> MllamaModel:
    """``model``'s module tree on the meta device, its FP8Linears at the same paths (the
    scales do not matter: only which layers run)."""
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    schemes = {m.scheme for m in fp8.values()} or {"per-tensor"}
    with torch.device("meta"):
        twin = MllamaModel(model.config, model.semantics).eval()
        quantize_model(twin, dict.fromkeys(fp8, 1.0), dtype, schemes.pop())
    return twin


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
    checks = {}
    for graph, cls in GRAPH_MODULES.items():
        path = folder / f"{graph}.onnx"
        modules = {n: model.get_submodule(n) for n in expected[graph].values()}
        layout = check_fp8_graph(path, expected[graph], modules, options.fp8_weights)
        with step(f"checking the {graph} graph against PyTorch (FP8 GEMM outputs shared)"):
            numbers = check_fp8_numerics(cls(model), path, expected[graph], model, feeds[graph])
        checks[graph] = {**numbers, "quantized_layers": layout["quantized_layers"]}
    return checks


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
