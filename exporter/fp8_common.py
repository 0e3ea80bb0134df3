"""The family-independent pieces of a family's "fp8" part (exporter/fp8.py is Mllama's): which
FP8 initializers each graph holds, the manifest's quantization entry, the FP8 layers of the
check model read from a checkpoint, and the check of every graph in a folder."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mllama_export.graphs.family import family_of
from mllama_export.graphs.progress import step
from mllama_export.graphs.quant import FP8Linear, quantize_model, replace_module, scale_from_amax

from .fp8_check import check_fp8_graph, check_fp8_numerics
from .layermajor import read_float
from .onnx_export import example_inputs
from .options import BuildOptions

# ONNX Runtime's graph optimization level the FP8 graphs need (engines/onnxrt.py)
ORT_OPTIMIZATION = "basic"


def onnx_weight_names(graph: nn.Module, model: nn.Module, args: tuple) -> dict[str, str]:
    """{ONNX initializer name of an FP8 weight: its layer's name in the model} for the FP8
    layers that ``graph`` runs on ``args`` (a graph module may hold layers it never calls:
    Mllama's vision graph holds the cross-attention layers for their k/v projections only).
    The exporter names initializers by their path in the graph module, which may differ from
    the model's."""
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


def graph_weight_names(twin: nn.Module, config: Any, dtype: torch.dtype) -> dict[str, dict]:
    """{graph: {FP8 initializer name: layer name}} of every graph of the family, run on
    example inputs on ``twin``, a quantized model on the meta device (only which layers run
    matters, and a real forward of the traced sizes costs minutes at full size)."""
    names = {}
    for graph, cls in family_of(config).part("graph_modules").items():
        args = tuple(a.to("meta") for a in example_inputs(cls.INPUTS, config, dtype))
        names[graph] = onnx_weight_names(cls(twin), twin, args)
    return names


def input_amax(quantization: dict | None) -> dict[str, float]:
    """{layer: calibrated input amax} of a manifest's ``quantization`` entry."""
    layers = (quantization or {}).get("layers", {})
    return {name: float(layer["input_amax"]) for name, layer in layers.items()}


WEIGHT_SCHEMES_TEXT = {
    "per-tensor": "per tensor: scale = max |w| / 448, one scalar; stored as float8e4m3fn "
    "initializers [in, out] behind DequantizeLinear with no axis (the layout TensorRT's FP8 "
    "GEMM fusion recognizes)",
    "per-channel": "per output channel: scale = max |w| over the input dim / 448; stored as "
    "float8e4m3fn initializers [in, out] behind DequantizeLinear(axis=1)",
}


def quantization_entry(
    names: Sequence[str],
    amax: Mapping[str, float],
    cases: Sequence,
    options: BuildOptions,
    builtin: str,
    steps: int,
) -> dict:
    """The manifest's ``quantization`` entry; ``builtin`` names the family's built-in
    evaluation set (where the calibration came from without --calibration)."""
    layers = {
        name: {
            "input_amax": amax[name],
            "input_scale": float(scale_from_amax(torch.tensor(amax[name]), options.dtype)),
        }
        for name in names
    }
    if options.calibration is None:
        source = f"{builtin}; `mllama-export validate` judges the same cases by default"
    else:
        source = f"user folder {options.calibration} (prompts.jsonl)"
    return {
        "format": "float8e4m3fn (E4M3, finite-only; max 448)",
        "scheme": "explicit QuantizeLinear/DequantizeLinear in the ONNX graphs; TensorRT "
        "builds them strongly typed, with no precision flags",
        "activations": "per tensor, static: scale = calibrated max |input| / 448",
        "weight_scheme": options.fp8_weights,
        "weights": WEIGHT_SCHEMES_TEXT[options.fp8_weights],
        "rounding": "round to nearest even, saturating to +-448",
        "unquantized_dtype": str(options.dtype).removeprefix("torch."),
        "vision_encoder": options.fp8_vision,
        "excluded": list(options.fp8_exclude),
        "onnxruntime_optimization": ORT_OPTIMIZATION,
        "calibration": {
            "set": source,
            "cases": [case.name for case in cases],
            "decode_steps": steps,
            "reference": "our PyTorch graphs, float32, run one layer at a time",
        },
        "layers": layers,
    }


def fp8_linear(weights: Any, name: str, meta: nn.Module, amax: float, dtype, scheme) -> FP8Linear:
    """The FP8Linear of checkpoint layer ``name`` (``meta``: its Linear on the meta device),
    its weight quantized from the float32 values."""
    linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None)
    linear.weight = nn.Parameter(read_float(weights, f"{name}.weight", torch.float32))
    if meta.bias is not None:
        linear.bias = nn.Parameter(read_float(weights, f"{name}.bias", torch.float32))
    return FP8Linear(linear, amax, dtype, scheme)


def load_quantized_model(
    weights: Any,
    model: nn.Module,
    amax: Mapping[str, float],
    dtype: torch.dtype,
    scheme: str,
    buffers: Mapping[str, torch.Tensor],
) -> nn.Module:
    """``model`` (the family's, built on the meta device) filled from the checkpoint
    ``weights`` as the artifacts hold it: FP8Linears with the calibrated ``amax``, every other
    parameter in ``dtype``, ``buffers`` (a checkpoint's missing non-persistent ones) set.
    Read tensor by tensor: FP8 weights are quantized from their float32 values, one at a
    time, never a float32 model."""
    fp8_params = {f"{name}.{p}" for name in amax for p in ("weight", "bias")}
    state = {
        name: read_float(weights, name, dtype)
        for name, _ in model.named_parameters()
        if name not in fp8_params
    }
    model.load_state_dict(state, assign=True, strict=False)
    for name, value in amax.items():
        meta = model.get_submodule(name)
        replace_module(model, name, fp8_linear(weights, name, meta, value, dtype, scheme))
    for name, tensor in buffers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, tensor)
    return model.eval()


def meta_twin(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A quantized ``model``'s module tree on the meta device (``build``: the family's model
    as ``model`` was built), its FP8Linears at the same paths (the scales do not matter: only
    which layers run)."""
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    schemes = {m.scheme for m in fp8.values()} or {"per-tensor"}
    with torch.device("meta"):
        twin = build().eval()
        quantize_model(twin, dict.fromkeys(fp8, 1.0), dtype, schemes.pop())
    return twin


class Recorder:
    """A backend that keeps every feed it is given (the FP8 check's inputs, generated by a
    Runner over recording backends)."""

    def __init__(self, backend):
        self.backend, self.inputs, self.outputs = backend, backend.inputs, backend.outputs
        self.name = "recorder"
        self.feeds: list[dict[str, np.ndarray]] = []

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({k: np.array(v) for k, v in feed.items()})
        return self.backend.infer(feed)


def check_graphs(
    model: nn.Module,
    folder: Path,
    options: BuildOptions,
    expected: Mapping[str, Mapping[str, str]],
    feeds: Mapping[str, list],
) -> dict[str, dict]:
    """Checks each of the family's FP8 graphs in ``folder`` against ``model`` (quantized as
    the artifacts hold it): structure and values (check_fp8_graph), then the numbers on
    ``feeds`` with every GEMM output shared (check_fp8_numerics). ``expected``: {graph:
    {FP8 initializer: layer}}. Returns {graph: check entry} with its quantized layers."""
    checks = {}
    for graph, cls in family_of(model.config).part("graph_modules").items():
        path = folder / f"{graph}.onnx"
        modules = {n: model.get_submodule(n) for n in expected[graph].values()}
        layout = check_fp8_graph(path, dict(expected[graph]), modules, options.fp8_weights)
        with step(f"checking the {graph} graph against PyTorch (FP8 GEMM outputs shared)"):
            numbers = check_fp8_numerics(
                cls(model), path, dict(expected[graph]), model, feeds[graph]
            )
        checks[graph] = {**numbers, "quantized_layers": layout["quantized_layers"]}
    return checks
