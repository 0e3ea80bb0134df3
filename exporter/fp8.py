"""`--precision fp8`: calibrate, quantize the model in place, and check the exported Q/DQ.

Explicit quantization as TensorRT recommends it for FP8: the ONNX graph itself holds
QuantizeLinear/DequantizeLinear (float8e4m3fn) around every quantized GEMM, the network is
built strongly typed (no precision flags; the graph's types are obeyed as written), and
every other op runs in float16. The same Q/DQ graph runs on ONNX Runtime (CPU included) with
graph optimization at BASIC: higher levels fuse Q/DQ + MatMul into integer-only kernels
that reject float8 inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import load_external_data_for_tensor
from torch import nn

from mllama_export.engines.runner import Limits
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.model import MllamaModel
from mllama_export.graphs.progress import info
from mllama_export.graphs.quant import FP8Linear, quantizable_linears, quantize_model

from .calibrate import CALIBRATION_STEPS, calibrate
from .options import BuildOptions

FP8 = onnx.TensorProto.FLOAT8E4M3FN
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
    with torch.device("meta"):
        model = MllamaModel(config, options.xattn_mask)
    names = quantizable_linears(model, options.fp8_vision, options.fp8_exclude)
    if not names:
        raise MllamaExportError(
            f"--fp8-exclude {' '.join(options.fp8_exclude)} leaves no layer in FP8; build "
            "with --precision fp16 for that"
        )
    return names


def calibration_cases(config: MllamaConfig, options: BuildOptions, checkpoint: Path) -> list:
    """The user's calibration folder (prompts.jsonl, tokenized and preprocessed with the
    checkpoint's own tokenizer and preprocessor config), else the built-in evaluation set."""
    from mllama_export.validate.evalset import build_evalset, read_cases

    limits = Limits(options.max_batch, options.max_seq_len, options.max_images)
    if options.calibration is None:
        return build_evalset(config, limits, CALIBRATION_STEPS)
    return read_cases(options.calibration, config, checkpoint)


def quantize_fp8(
    model: MllamaModel,
    config: MllamaConfig,
    options: BuildOptions,
    checkpoint: Path,
) -> dict:
    """Calibrates ``model`` (float32) on the calibration set, then quantizes it in place
    (FP8 linears, float16 elsewhere). Returns the manifest's ``quantization`` entry."""
    names = quantizable_linears(model, options.fp8_vision, options.fp8_exclude)
    limits = Limits(options.max_batch, options.max_seq_len, options.max_images)
    cases = calibration_cases(config, options, checkpoint)
    where = "built-in evaluation set" if options.calibration is None else str(options.calibration)
    info(
        f"calibrating FP8 scales of {len(names)} linear layers on the {where} "
        f"({len(cases)} cases, float32)"
    )
    amax = calibrate(model, names, cases, limits, CALIBRATION_STEPS)
    quantize_model(model, amax, options.dtype)
    return _quantization_entry(model, names, amax, cases, options)


def _quantization_entry(model, names, amax, cases, options: BuildOptions) -> dict:
    layers = {}
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, FP8Linear)
        layers[name] = {
            "input_amax": amax[name],
            "input_scale": float(layer.input_scale),
            "weight_scale_range": [
                float(layer.weight_scale.min()),
                float(layer.weight_scale.max()),
            ],
        }
    if options.calibration is None:
        source = (
            "built-in evaluation set (validate/evalset.py build_evalset, seed 0); "
            "`mllama-export validate` judges the same cases by default"
        )
    else:
        source = f"user folder {options.calibration} (prompts.jsonl)"
    return {
        "format": "float8e4m3fn (E4M3, finite-only; max 448)",
        "scheme": "explicit QuantizeLinear/DequantizeLinear in the ONNX graphs; TensorRT "
        "builds them strongly typed, with no precision flags",
        "activations": "per tensor, static: scale = calibrated max |input| / 448",
        "weights": "per output channel: scale = max |w| over the input dim / 448; stored as "
        "float8e4m3fn initializers [in, out] behind DequantizeLinear(axis=1)",
        "rounding": "round to nearest even, saturating to +-448",
        "unquantized_dtype": str(options.dtype).removeprefix("torch."),
        "vision_encoder": options.fp8_vision,
        "excluded": list(options.fp8_exclude),
        "onnxruntime_optimization": ORT_OPTIMIZATION,
        "calibration": {
            "set": source,
            "cases": [case.name for case in cases],
            "decode_steps": CALIBRATION_STEPS,
            "reference": "our PyTorch graphs, float32",
        },
        "layers": layers,
    }


def check_fp8_graph(
    path: Path, expected: dict[str, str], modules: dict[str, FP8Linear] | None = None
) -> dict:
    """The FP8 structure of one exported graph, checked; raises on any deviation.

    Every MatMul that reads a DequantizeLinear must read one on both inputs: the activation
    through QuantizeLinear -> DequantizeLinear (float8e4m3fn, one constant scalar scale), the
    weight as a float8e4m3fn initializer [in, out] with a constant per-output-channel scale
    on axis 1. The FP8 weights must be exactly the ``expected`` ones ({initializer name:
    layer name}, see onnx_weight_names) and no Q/DQ may stand anywhere else. With
    ``modules`` ({layer name: FP8Linear}), each layer's FP8 weight bytes, weight scales and
    input scale in the file must equal the PyTorch module's bit for bit. Returns
    {"quantized_layers": [layer names], "matmuls": n, "fp8_matmuls": n}.
    """
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    producer = {o: n for n in g.node for o in n.output}
    problems: list[str] = []

    def const_dims(name: str) -> list[int] | None:
        if name in inits:
            return list(inits[name].dims)
        if name in consts:
            return list(onnx.numpy_helper.to_array(consts[name].attribute[0].t).shape)
        return None

    def const_type(name: str) -> int | None:
        if name in inits:
            return inits[name].data_type
        if name in consts:
            return consts[name].attribute[0].t.data_type
        return None

    def axis_of(node) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    def value(name: str) -> np.ndarray:
        if name in consts:
            return onnx.numpy_helper.to_array(consts[name].attribute[0].t)
        tensor = inits[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(tensor, str(path.parent))
        return onnx.numpy_helper.to_array(tensor)

    def same(name: str, expected: torch.Tensor) -> bool:
        found = value(name)
        if expected.dtype == FP8Linear.WEIGHT_DTYPE:
            want = expected.contiguous().view(torch.uint8).numpy()
            return found.shape == want.shape and found.tobytes() == want.tobytes()
        return bool(np.array_equal(found.astype(np.float64).ravel(), expected.double().ravel()))

    quantized, fp8_users, matmuls = [], set(), 0
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        matmuls += 1
        dq_in = [producer.get(i) for i in node.input]
        is_dq = [p is not None and p.op_type == "DequantizeLinear" for p in dq_in]
        if not any(is_dq):
            continue
        where = f"MatMul {node.name}"
        if not all(is_dq):
            problems.append(f"{where} has a DequantizeLinear on one input only")
            continue
        act, wdq = dq_in
        fp8_users.update((act.output[0], wdq.output[0]))
        q = producer.get(act.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            problems.append(f"{where}: its activation DequantizeLinear is not fed by a Quantize")
        else:
            fp8_users.add(q.output[0])
            if len(q.input) < 3 or const_type(q.input[2]) != FP8:
                problems.append(f"{where}: QuantizeLinear without a float8e4m3fn zero point")
            if q.input[1] != act.input[1]:
                problems.append(f"{where}: Quantize and Dequantize use different scales")
            if const_dims(q.input[1]) not in ([], [1]):
                problems.append(f"{where}: activation scale is not one constant per tensor")
        weight = wdq.input[0]
        if weight not in inits or inits[weight].data_type != FP8 or len(inits[weight].dims) != 2:
            problems.append(f"{where}: weight {weight} is not a 2-D float8e4m3fn initializer")
            continue
        out_dim = inits[weight].dims[1]
        axis = axis_of(wdq) % 2
        if axis != 1 or const_dims(wdq.input[1]) != [out_dim]:
            problems.append(
                f"{where}: weight scale of shape {const_dims(wdq.input[1])} on axis {axis}; "
                f"expected one constant per output channel ([{out_dim}]) on axis 1"
            )
        quantized.append(weight)
        layer = modules.get(expected.get(weight, "")) if modules else None
        if layer is not None:
            bad = [
                what
                for what, name, tensor in (
                    ("FP8 weight", weight, layer.weight),
                    ("weight scales", wdq.input[1], layer.weight_scale),
                    ("input scale", act.input[1], layer.input_scale),
                )
                if not same(name, tensor)
            ]
            if bad:
                problems.append(f"{expected[weight]}: {', '.join(bad)} differ from PyTorch's")
    fp8_weights = {t.name for t in g.initializer if t.data_type == FP8 and len(t.dims) == 2}
    strays = [
        n.name
        for n in g.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in fp8_users
    ]
    if strays:
        problems.append(f"Q/DQ nodes outside any quantized MatMul: {strays[:4]}")
    if unused := fp8_weights - set(quantized):
        problems.append(f"FP8 weights not read by a quantized MatMul: {sorted(unused)[:4]}")
    if sorted(set(quantized)) != sorted(expected):
        missing = sorted(set(expected) - set(quantized))
        extra = sorted(set(quantized) - set(expected))
        problems.append(f"quantized layers differ from the plan: missing {missing}, extra {extra}")
    if problems:
        raise MllamaExportError(
            f"the FP8 graph {path.name} is malformed: {'; '.join(problems)}; please report it"
        )
    return {
        "quantized_layers": sorted(expected[w] for w in set(quantized)),
        "matmuls": matmuls,
        "fp8_matmuls": len(quantized),
    }


__all__ = [
    "ORT_OPTIMIZATION",
    "check_fp8_graph",
    "onnx_weight_names",
    "quantize_fp8",
]
