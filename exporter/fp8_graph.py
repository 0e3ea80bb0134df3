"""The FP8 structure of an exported graph: the Q/DQ layout of every quantized GEMM, checked.

Part of the build's FP8 check (exporter/fp8_check.py holds the numbers): every quantized
MatMul reads the layout of the build's weight scheme, the FP8 layers are exactly the planned
ones, no Q/DQ stands elsewhere, and every FP8 weight, weight scale and input scale in the
file equals PyTorch's bit for bit. Also: where a TensorRT engine put each FP8 GEMM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import load_external_data_for_tensor

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.quant import FP8Linear

FP8 = onnx.TensorProto.FLOAT8E4M3FN


@dataclass(frozen=True)
class QuantizedMatMul:
    """One FP8 GEMM of an ONNX graph, by tensor names."""

    node: str
    weight: str  # the float8e4m3fn initializer
    activation: str  # the QuantizeLinear's input (the GEMM's unquantized input)
    output: str


def check_fp8_graph(
    path: Path,
    expected: dict[str, str],
    modules: dict[str, FP8Linear] | None = None,
    scheme: str = "per-tensor",
) -> dict:
    """The FP8 structure of one exported graph, checked; raises on any deviation.

    Every MatMul that reads a DequantizeLinear must read one on both inputs: the activation
    through QuantizeLinear -> DequantizeLinear (float8e4m3fn, one constant scalar scale), the
    weight as a float8e4m3fn initializer [in, out] with the ``scheme``'s constant scale (one
    scalar and no axis, or one per output channel on axis 1). The FP8 weights must be exactly
    the ``expected`` ones ({initializer name: layer name}, see fp8.onnx_weight_names) and no
    Q/DQ may stand anywhere else. With ``modules`` ({layer name: FP8Linear}), each layer's FP8
    weight bytes, weight scale and input scale in the file must equal the PyTorch module's
    bit for bit. Returns {"quantized_layers": [names], "matmuls": n, "fp8_matmuls": n}.
    """
    graph = Graph(path)
    problems: list[str] = []
    quantized, fp8_users, matmuls = [], set(), 0
    for node in graph.nodes:
        if node.op_type != "MatMul":
            continue
        matmuls += 1
        dq_in = [graph.producer.get(i) for i in node.input]
        is_dq = [p is not None and p.op_type == "DequantizeLinear" for p in dq_in]
        if not any(is_dq):
            continue
        where = _layer_name(graph, dq_in, expected) or _describe(graph, node)
        if not all(is_dq):
            problems.append(f"{where}: a DequantizeLinear on one MatMul input only")
            continue
        act, wdq = dq_in
        fp8_users.update((act.output[0], wdq.output[0]))
        problems += _check_activation(graph, act, where, fp8_users)
        weight = wdq.input[0]
        if not graph.is_fp8_matrix(weight):
            problems.append(f"{where}: weight {weight} is not a 2-D float8e4m3fn initializer")
            continue
        problems += _check_weight_scale(graph, wdq, where, scheme)
        quantized.append(weight)
        layer = modules.get(expected.get(weight, "")) if modules else None
        if layer is not None:
            problems += _check_values(graph, layer, weight, wdq, act, where)
    problems += _check_plan(graph, fp8_users, quantized, expected)
    if problems:
        raise MllamaExportError(
            f"the FP8 graph {path.name} is malformed: {'; '.join(problems)}; please report it"
        )
    return {
        "quantized_layers": sorted(expected[w] for w in set(quantized) if w in expected),
        "matmuls": matmuls,
        "fp8_matmuls": len(quantized),
    }


class Graph:
    """An ONNX graph's structure (weights left on disk), with lookups the checks share."""

    def __init__(self, path: Path):
        self.path = path
        self.model = onnx.load(str(path), load_external_data=False)
        g = self.model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.producer = {o: n for n in g.node for o in n.output}

    def dims(self, name: str) -> list[int] | None:
        if name in self.inits:
            return list(self.inits[name].dims)
        if name in self.consts:
            return list(onnx.numpy_helper.to_array(self.consts[name].attribute[0].t).shape)
        return None

    def dtype(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        if name in self.consts:
            return self.consts[name].attribute[0].t.data_type
        return None

    def is_fp8_matrix(self, name: str) -> bool:
        t = self.inits.get(name)
        return t is not None and t.data_type == FP8 and len(t.dims) == 2

    def value(self, name: str) -> np.ndarray:
        if name in self.consts:
            return onnx.numpy_helper.to_array(self.consts[name].attribute[0].t)
        tensor = self.inits[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(tensor, str(self.path.parent))
        return onnx.numpy_helper.to_array(tensor)

    def matmuls(self) -> list[QuantizedMatMul]:
        """The MatMuls reading an FP8 weight through DequantizeLinear. The activation is
        the QuantizeLinear's input where the MatMul reads QuantizeLinear -> DequantizeLinear,
        else the MatMul's input itself (a missing activation Q/DQ then shows in the GEMM)."""
        found = []
        for node in self.nodes:
            if node.op_type != "MatMul":
                continue
            act, wdq = (self.producer.get(i) for i in node.input)
            if not (wdq and wdq.op_type == "DequantizeLinear" and self.is_fp8_matrix(wdq.input[0])):
                continue
            x = node.input[0]
            if act is not None and act.op_type == "DequantizeLinear":
                q = self.producer.get(act.input[0])
                x = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else x
            found.append(QuantizedMatMul(node.name, wdq.input[0], x, node.output[0]))
        return found


def _layer_name(graph: Graph, dq_in, expected: dict[str, str]) -> str | None:
    for p in dq_in:
        if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in expected:
            return expected[p.input[0]]
    return None


def _describe(graph: Graph, node) -> str:
    weights = [i for i in node.input if i in graph.inits]
    return f"MatMul {node.name}" + (f" (weight {weights[0]})" if weights else "")


def _axis(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _check_activation(graph: Graph, act, where: str, fp8_users: set) -> list[str]:
    q = graph.producer.get(act.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return [f"{where}: its activation DequantizeLinear is not fed by a QuantizeLinear"]
    fp8_users.add(q.output[0])
    problems = []
    if len(q.input) < 3 or graph.dtype(q.input[2]) != FP8:
        problems.append(f"{where}: QuantizeLinear without a float8e4m3fn zero point")
    if q.input[1] != act.input[1]:
        problems.append(f"{where}: Quantize and Dequantize use different scales")
    if graph.dims(q.input[1]) not in ([], [1]):
        problems.append(f"{where}: activation scale is not one constant per tensor")
    return problems


def _check_weight_scale(graph: Graph, wdq, where: str, scheme: str) -> list[str]:
    out_dim = graph.inits[wdq.input[0]].dims[1]
    dims, axis = graph.dims(wdq.input[1]), _axis(wdq)
    if scheme == "per-tensor":
        if dims not in ([], [1]) or axis is not None:
            return [
                f"{where}: weight scale of shape {dims} on axis {axis}; expected one "
                "constant scalar and no axis (per-tensor)"
            ]
        return []
    if (1 if axis is None else axis % 2) != 1 or dims != [out_dim]:
        return [
            f"{where}: weight scale of shape {dims} on axis {axis}; expected one constant "
            f"per output channel ([{out_dim}]) on axis 1 (per-channel)"
        ]
    return []


def _check_values(graph: Graph, layer: FP8Linear, weight: str, wdq, act, where) -> list[str]:
    def same(name: str, expected: torch.Tensor) -> bool:
        found = graph.value(name)
        if expected.dtype == FP8Linear.WEIGHT_DTYPE:
            want = expected.contiguous().view(torch.uint8).numpy()
            return found.shape == want.shape and found.tobytes() == want.tobytes()
        want = expected.double().reshape(-1).numpy()
        return bool(np.array_equal(found.astype(np.float64).reshape(-1), want))

    bad = [
        what
        for what, name, tensor in (
            ("FP8 weight", weight, layer.weight),
            ("weight scale", wdq.input[1], layer.weight_scale),
            ("input scale", act.input[1], layer.input_scale),
        )
        if not same(name, tensor)
    ]
    return [f"{where}: {', '.join(bad)} differ from PyTorch's"] if bad else []


def _stray_places(graph: Graph, strays: list, expected: dict[str, str]) -> list[str]:
    """Each stray Q/DQ chain by its first node and what it reads: the output of which FP8
    layer, else the tensor's name."""
    outputs = {m.output: expected.get(m.weight, m.weight) for m in graph.matmuls()}
    stray_outputs = {o for n in strays for o in n.output}
    places = []
    for node in strays:
        source = node.input[0]
        if source in stray_outputs:
            continue  # the DQ of a stray Q: described with it
        what = f"the output of {outputs[source]}" if source in outputs else source
        places.append(f"{node.op_type} {node.name!r} on {what}")
    return places


def _check_plan(graph: Graph, fp8_users: set, quantized: list, expected: dict) -> list[str]:
    problems = []
    strays = [
        n
        for n in graph.nodes
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in fp8_users
    ]
    if strays:
        where = _stray_places(graph, strays, expected)
        problems.append(f"Q/DQ nodes outside any quantized MatMul: {', '.join(where[:4])}")
    fp8_weights = {n for n in graph.inits if graph.is_fp8_matrix(n)}
    if unused := fp8_weights - set(quantized):
        problems.append(f"FP8 weights not read by a quantized MatMul: {sorted(unused)[:4]}")
    if sorted(set(quantized)) != sorted(expected):
        missing = sorted(expected[w] for w in set(expected) - set(quantized))
        extra = sorted(set(quantized) - set(expected))
        problems.append(
            f"quantized layers differ from the plan: not quantized {missing}, unplanned {extra}"
        )
    return problems


# -- TensorRT's side: which FP8 GEMMs an engine runs in FP8 ---------------------------------------


def fp8_engine_layers(engine_info: dict, path: Path, expected: dict[str, str]) -> dict:
    """Where TensorRT put each FP8 GEMM of the ONNX graph at ``path``: ``engine_info`` is the
    engine inspector's JSON (``IEngineInspector.get_engine_information(
    LayerInformationFormat.JSON)`` of an engine built with ``ProfilingVerbosity.DETAILED``,
    or ``trtexec --profilingVerbosity=detailed --exportLayerInfo=FILE``): a ``Layers`` list
    whose entries have a ``Name`` (the ONNX node names they fuse, joined by " + ") and
    ``Inputs`` with a ``Format/Datatype``. Returns {"fp8": [layers], "not_fp8": [layers],
    "unattributed": [layers]}: an FP8 layer whose GEMM's engine layer reads an FP8 input, one
    whose engine layer reads only 16/32-bit inputs (dequantized weights: the unfused
    fallback), and one whose node name no engine layer carries (inside a Myelin region,
    named by its first and last nodes only). Not run against a real engine here (no
    TensorRT); tests/test_fp8_check.py holds it to the documented format."""
    layers = [x if isinstance(x, dict) else {"Name": str(x)} for x in engine_info.get("Layers", [])]
    found: dict[str, list[str]] = {"fp8": [], "not_fp8": [], "unattributed": []}
    for matmul in Graph(path).matmuls():
        name = expected.get(matmul.weight, matmul.weight)
        token = re.compile(rf"(?<![\w.]){re.escape(matmul.node)}(?![\w.])")
        hits = [layer for layer in layers if token.search(str(layer.get("Name", "")))]
        if not hits:
            found["unattributed"].append(name)
            continue
        formats = [
            str(t.get("Format/Datatype", "")).lower() for h in hits for t in h.get("Inputs", [])
        ]
        fp8 = any("fp8" in f or "float8" in f or "e4m3" in f for f in formats)
        found["fp8" if fp8 else "not_fp8"].append(name)
    return found


__all__ = ["FP8", "QuantizedMatMul", "check_fp8_graph", "fp8_engine_layers"]
