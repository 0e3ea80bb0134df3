"""The FP8 check inside `build`: the Q/DQ structure of each graph, then its numbers, both sharp.

Structure (exporter/fp8_graph.py :func:`check_fp8_graph`): every quantized MatMul reads the
layout of the build's weight scheme, the FP8 layers are exactly the planned ones, no Q/DQ
stands elsewhere, and every FP8 weight, weight scale and input scale in the file equals
PyTorch's bit for bit.

Numbers (:func:`check_fp8_numerics`), on inputs a real prompt produces (left-padded batches,
images, the KV cache of a real prefill; Mllama's exporter/fp8_cases.py): ONNX Runtime runs the graph with
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
from pathlib import Path

import numpy as np
import onnx
import torch

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.quant import FP8Linear, fp8_qdq

from .fp8_graph import Graph, QuantizedMatMul, check_fp8_graph, fp8_engine_layers

# relative L2 of an FP8 GEMM's output against float64 on the same FP8 operands: the output's
# rounding to the graph's type (float16: 2^-11 relative at most, ~3e-4 RMS), with room
GEMM_LIMITS = {torch.float16: 1e-3, torch.float32: 1e-5}
# the 16-bit arithmetic between forced GEMMs: the fp16 gate's logits limit (and fp32's)
OUTPUT_LIMITS = {torch.float16: 1e-2, torch.float32: 1e-4}


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
    # no arena: it would keep a run's peak (at 11B the vision graph's attention, ~9 GB)
    # allocated while PyTorch runs the same graph after it
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(tapped), options, providers=["CPUExecutionProvider"])
    finally:
        tapped.unlink(missing_ok=True)


def _linear_taps(graph: torch.nn.Module, model: torch.nn.Module, parsed: Graph) -> dict:
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
    parsed = Graph(path)
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

    # each GEMM's forward replaced, not hooked after it: PyTorch's own 16-bit GEMM would be
    # thrown away, and on a CPU it is most of the graph's time at 11B
    def forced(module, name: str, tap):
        def forward(x: torch.Tensor) -> torch.Tensor:
            x_ort = torch.from_numpy(ort[tap.activation])
            y_ort = ort[tap.output]
            note("input", name, _rel_l2(x.numpy(), x_ort.numpy()))
            note("gemm", name, _rel_l2(y_ort, _exact(module, x_ort).numpy()))
            y = torch.from_numpy(y_ort)
            return y if module.bias is None else y + module.bias

        return forward

    with contextlib.ExitStack() as stack:
        for name, tap in layers:
            module = modules[name]
            module.forward = forced(module, name, tap)
            stack.callback(delattr, module, "forward")
        args = {s.name: torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in graph.INPUTS}
        with torch.inference_mode():
            outputs = graph(**args)
    if isinstance(outputs, torch.Tensor):  # a graph of one output returns it bare
        outputs = (outputs,)
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


__all__ = [
    "GEMM_LIMITS",
    "OUTPUT_LIMITS",
    "check_fp8_graph",
    "check_fp8_numerics",
    "fp8_engine_layers",
]
