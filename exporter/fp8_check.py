"""The FP8 check inside `build`: the Q/DQ structure of each graph, then its numbers, both sharp.

Structure (:func:`check_fp8_graph`): every quantized MatMul reads the layout of the build's
weight scheme, the FP8 layers are exactly the planned ones, no Q/DQ stands elsewhere, and
every FP8 weight, weight scale and input scale in the file equals PyTorch's bit for bit.

Numbers (:func:`check_fp8_numerics`), on inputs a real prompt produces (left-padded batches,
images, the KV cache of a real prefill; :func:`check_feeds`): ONNX Runtime runs the graph with
the input and the output of every GEMM exposed (the FP8 ones and the 16-bit Linears'), and
PyTorch runs the same graph with each GEMM's output *forced* to ONNX Runtime's. Then each
comparison is one that must hold to floating-point rounding, however sensitive the network:

- every GEMM: PyTorch's own computation on ONNX Runtime's GEMM input (the fake quantization
  and FP8 weight of an FP8Linear, the 16-bit weight of a Linear), in float32, against ONNX
  Runtime's GEMM output. The Q/DQ of the same input with the same scale agree bit for bit
  (tests/test_fp8.py), so what may differ is the GEMM's rounding to the graph's type:
  relative L2 at most GEMM_LIMITS (float16: 1e-3, where the output rounding alone gives
  ~3e-4; a wrong scale, a transposed weight or a missing Q/DQ gives 1e-2 or more);
- every GEMM's input, and the graph's outputs: what the 16-bit arithmetic between two GEMMs
  (a norm, rope and attention, an activation) computes from the same GEMM outputs, held to
  the fp16 gate's limit (OUTPUT_LIMITS). No chain of it spans more than one GEMM, so it
  cannot amplify fp16's rounding the way a whole network does, and no FP8 rounding boundary
  lies inside it.

Comparing whole FP8 graphs end to end could not be both: on a deep random network fp16's
op rounding tips GEMM inputs across FP8 rounding boundaries (one FP8 step, 6%, each), and
the network amplifies that past any limit a wrong scale would exceed. How far FP8 lands from
fp32 is the accuracy gate's verdict (`mllama-export validate`), not the build's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import load_external_data_for_tensor

from mllama_export.engines.backend import TorchBackend
from mllama_export.engines.runner import Limits, Runner
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.quant import FP8Linear, fp8_qdq

FP8 = onnx.TensorProto.FLOAT8E4M3FN
# relative L2 of an FP8 GEMM's output against float64 on the same FP8 operands: the output's
# rounding to the graph's type (float16: 2^-11 relative at most, ~3e-4 RMS), with room
GEMM_LIMITS = {torch.float16: 1e-3, torch.float32: 1e-5}
# the 16-bit arithmetic between forced GEMMs: the fp16 gate's logits limit (and fp32's)
OUTPUT_LIMITS = {torch.float16: 1e-2, torch.float32: 1e-4}


# -- structure ----------------------------------------------------------------------------------


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
    graph = _Graph(path)
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


class _Graph:
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


def _layer_name(graph: _Graph, dq_in, expected: dict[str, str]) -> str | None:
    for p in dq_in:
        if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in expected:
            return expected[p.input[0]]
    return None


def _describe(graph: _Graph, node) -> str:
    weights = [i for i in node.input if i in graph.inits]
    return f"MatMul {node.name}" + (f" (weight {weights[0]})" if weights else "")


def _axis(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _check_activation(graph: _Graph, act, where: str, fp8_users: set) -> list[str]:
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


def _check_weight_scale(graph: _Graph, wdq, where: str, scheme: str) -> list[str]:
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


def _check_values(graph: _Graph, layer: FP8Linear, weight: str, wdq, act, where) -> list[str]:
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


def _stray_places(graph: _Graph, strays: list, expected: dict[str, str]) -> list[str]:
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


def _check_plan(graph: _Graph, fp8_users: set, quantized: list, expected: dict) -> list[str]:
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


# -- numbers ------------------------------------------------------------------------------------


def _rel_l2(actual, expected) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def _tapped_session(path: Path, names: list[str], dtype: torch.dtype):
    """ONNX Runtime on ``path`` with ``names`` exposed as extra outputs: a copy of the graph
    (weights left where they are) beside it, removed once loaded."""
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    elem = onnx.helper.np_dtype_to_tensor_dtype(torch.empty((), dtype=dtype).numpy().dtype)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    tapped = path.with_name(f".{path.stem}.tapped.onnx")
    onnx.save(model, str(tapped))
    options = ort.SessionOptions()
    # FP8 Q/DQ runs on ONNX Runtime's CPU kernels only at BASIC (exporter/fp8.py)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(tapped), options, providers=["CPUExecutionProvider"])
    finally:
        tapped.unlink(missing_ok=True)


def _linear_taps(graph: torch.nn.Module, model: torch.nn.Module, parsed: _Graph) -> dict:
    """{weight initializer: (layer name, tap)} of the 16-bit Linears' MatMuls: the exporter
    names a Linear's weight after its path in the graph module, ``<path>.weight.transposed``
    (exporter/weightfile.py fold_weight_transposes)."""
    from .weightfile import graph_names

    paths = graph_names(graph, model)
    taps = {}
    for node in parsed.nodes:
        weight = node.input[1] if node.op_type == "MatMul" else ""
        source = paths.get(weight.removesuffix(".transposed"), "")
        if weight.endswith(".weight.transposed") and source.endswith(".weight"):
            layer = source.removesuffix(".weight")
            if isinstance(model.get_submodule(layer), torch.nn.Linear):
                taps[weight] = (
                    layer,
                    QuantizedMatMul(node.name, weight, node.input[0], node.output[0]),
                )
    return taps


def check_fp8_numerics(
    graph: torch.nn.Module,
    path: Path,
    expected: dict[str, str],
    model: torch.nn.Module,
    feeds: list[dict[str, np.ndarray]],
) -> dict:
    """ONNX Runtime's FP8 graph at ``path`` against ``graph`` (PyTorch, the same quantized
    ``model``) with every GEMM's output shared: the FP8 GEMMs' and, so that no chain of
    16-bit arithmetic between two compared tensors spans more than one GEMM, the 16-bit
    Linears' too (module docstring). On each of ``feeds``. ``expected``: {FP8 initializer
    name: layer name}. Raises naming the layers that disagree; returns the figures."""
    parsed = _Graph(path)
    layers = {m.weight: (expected[m.weight], m) for m in parsed.matmuls() if m.weight in expected}
    layers |= _linear_taps(graph, model, parsed)
    modules = {name: model.get_submodule(name) for name, _ in layers.values()}
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    taps = sorted({n for _, m in layers.values() for n in (m.activation, m.output)})
    session = _tapped_session(path, taps, dtype)
    worst: dict[str, dict[str, float]] = {"gemm": {}, "input": {}, "output": {}}
    for feed in feeds:
        names = [o.name for o in session.get_outputs()]
        ort = dict(zip(names, session.run(None, feed), strict=True))
        _forced_run(graph, feed, ort, layers.values(), modules, worst)
    fp8 = {name for name, _ in layers.values() if isinstance(modules[name], FP8Linear)}
    return _judge(path, worst, dtype, len(feeds), fp8)


def _exact(module, x: torch.Tensor) -> torch.Tensor:
    """What the GEMM must compute from its input ``x`` (ONNX Runtime's), in float32: the
    fake quantization of an FP8Linear, the 16-bit weight of a Linear, no bias."""
    if isinstance(module, FP8Linear):
        return fp8_qdq(x, module.input_scale).float() @ module.dequantized_weight().float()
    return x.float() @ module.weight.float().t()


def _forced_run(graph, feed, ort, layers, modules, worst) -> None:
    def note(kind: str, name: str, value: float) -> None:
        worst[kind][name] = max(worst[kind].get(name, 0.0), value)

    def forced(name: str, tap):
        def hook(module, args, output):
            x_ort = torch.from_numpy(ort[tap.activation])
            y_ort = ort[tap.output]
            note("input", name, _rel_l2(args[0].numpy(), x_ort.numpy()))
            note("gemm", name, _rel_l2(y_ort, _exact(module, x_ort).numpy()))
            y = torch.from_numpy(y_ort)
            return y if module.bias is None else y + module.bias

        return hook

    with contextlib.ExitStack() as stack:
        for name, tap in layers:
            handle = modules[name].register_forward_hook(forced(name, tap))
            stack.callback(handle.remove)
        args = [torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in graph.INPUTS]
        with torch.inference_mode():
            outputs = graph(*args)
    for spec, out in zip(graph.OUTPUTS, outputs, strict=True):
        note("output", spec.name, _rel_l2(ort[spec.name], out.float().numpy()))


def _judge(path: Path, worst: dict, dtype: torch.dtype, cases: int, fp8: set) -> dict:
    gemm_limit, limit = GEMM_LIMITS[dtype], OUTPUT_LIMITS[dtype]

    def kind(name: str) -> str:
        return "FP8 GEMM" if name in fp8 else "GEMM"

    problems = [
        f"{name}: ONNX Runtime's {kind(name)} differs from PyTorch's "
        + ("fake quantization" if name in fp8 else "weight")
        + f" on the same input by relative L2 {err:.2e} (limit {gemm_limit:g}: the "
        "output's rounding)"
        for name, err in sorted(worst["gemm"].items(), key=lambda kv: -kv[1])
        if not err <= gemm_limit
    ]
    problems += [
        f"{name}: the input of its {kind(name)} differs by relative L2 {err:.2e} (limit {limit:g})"
        for name, err in sorted(worst["input"].items(), key=lambda kv: -kv[1])
        if not err <= limit
    ]
    problems += [
        f"output {name} differs by relative L2 {err:.2e} (limit {limit:g})"
        for name, err in worst["output"].items()
        if not err <= limit
    ]
    if problems:
        raise MllamaExportError(
            f"the FP8 graph {path.name} disagrees with PyTorch with every GEMM output "
            f"shared: {'; '.join(problems[:6])}"
            + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
            + "; the ONNX export is wrong, please report it"
        )
    fp8_gemms = [v for k, v in worst["gemm"].items() if k in fp8]
    return {
        "ran": True,
        "method": "every GEMM output shared, FP8 and 16-bit (exporter/fp8_check.py)",
        "cases": cases,
        "gemms": len(worst["gemm"]),
        "fp8_gemms": len(fp8_gemms),
        "gemm_rel_l2_max": max(worst["gemm"].values(), default=0.0),
        "fp8_gemm_rel_l2_max": max(fp8_gemms, default=0.0),
        "gemm_limit_rel_l2": gemm_limit,
        "gemm_inputs_rel_l2_max": max(worst["input"].values(), default=0.0),
        "limit_rel_l2": limit,
        "outputs": {k: {"rel_l2": v} for k, v in worst["output"].items()},
    }


# -- inputs a real prompt produces ---------------------------------------------------------------


class _RowByRow:
    """The vision backend run one batch row at a time, outputs joined on the batch axis."""

    def __init__(self, backend):
        self.backend, self.inputs, self.outputs = backend, backend.inputs, backend.outputs
        self.name = "row-by-row"

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [
            self.backend.infer({k: v[b : b + 1] for k, v in feed.items()})
            for b in range(len(feed["aspect_ratio_ids"]))
        ]
        return {s.name: np.concatenate([r[s.name] for r in rows], axis=1) for s in self.outputs}


class _Recorder:
    """A backend that keeps every feed it is given."""

    def __init__(self, backend):
        self.backend, self.inputs, self.outputs = backend, backend.inputs, backend.outputs
        self.name = "recorder"
        self.feeds: list[dict[str, np.ndarray]] = []

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({k: np.array(v) for k, v in feed.items()})
        return self.backend.infer(feed)


def check_cases(config: MllamaConfig, limits: Limits) -> list:
    """Two prompts' worth of real inputs, at sizes unlike the traced ones (batch 2, 2 images):
    one prompt with an image (batch 1), and a left-padded batch of up to 3 prompts (a text-only
    one, one with text before its image, one with the image first) whose images go to the
    vision graph one row at a time (11B's tiles make a batch of images heavy on a CPU)."""
    from mllama_export.validate.evalset import _CaseMaker

    longest = max(4, min(20, limits.max_seq_len - 4))
    maker = _CaseMaker(config, seed=7, longest=longest)
    one_tile = next(
        r
        for r in range(1, config.vision.max_aspect_ratio_id + 1)
        if np.prod(config.vision.supported_aspect_ratios[r - 1]) == 1
    )
    rows = [(5, []), (11, [(4, one_tile)]), (8, [(1, one_tile)])][: limits.max_batch]
    return [maker.case("check-image", [(9, [(1, one_tile)])]), maker.case("check-padded", rows)]


def check_feeds(model: torch.nn.Module, limits: Limits, dtype: torch.dtype) -> dict[str, list]:
    """{graph: [feeds]} of the check cases generated greedily by ``model`` (PyTorch, the
    build's precision): the vision graph's of the one-image case, every prefill, and the
    first two decode steps of each case."""
    from mllama_export.graphs.model import DecodeGraph, PrefillGraph, VisionGraph

    io = str(dtype).removeprefix("torch.")
    graphs = [VisionGraph(model), PrefillGraph(model), DecodeGraph(model)]
    rec = [_Recorder(TorchBackend(g)) for g in graphs]
    runner = Runner(model.config, *rec, limits, model_dtype=io)
    feeds = {"vision": [], "prefill": [], "decode": []}
    for i, case in enumerate(check_cases(model.config, limits)):
        before = [len(r.feeds) for r in rec]
        # the padded batch's vision K/V are only an input of the text graphs' check
        runner.vision = rec[0] if i == 0 else _RowByRow(rec[0].backend)
        runner.generate_ids(case.prompts, case.images, 3, stop_tokens=set())
        vision, prefill, decode = (r.feeds[b:] for r, b in zip(rec, before, strict=True))
        feeds["vision"] += vision if i == 0 else []
        feeds["prefill"] += prefill
        feeds["decode"] += decode[:2]
    return feeds


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
    import re

    layers = [x if isinstance(x, dict) else {"Name": str(x)} for x in engine_info.get("Layers", [])]
    found: dict[str, list[str]] = {"fp8": [], "not_fp8": [], "unattributed": []}
    for matmul in _Graph(path).matmuls():
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


__all__ = [
    "GEMM_LIMITS",
    "OUTPUT_LIMITS",
    "check_cases",
    "check_feeds",
    "check_fp8_graph",
    "check_fp8_numerics",
    "fp8_engine_layers",
]
