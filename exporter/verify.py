"""The check inside `build`: ONNX Runtime on the exported files against the PyTorch graphs.

Two phases, so that the PyTorch model and ONNX Runtime's copy of the weights are never in
memory together: first PyTorch computes every graph's outputs on every check case (then its
model is dropped), then each graph is loaded in ONNX Runtime, run on the same inputs
(regenerated from their seeds) and compared, and dropped before the next one is loaded.
exporter/checkplan.py decides, from a memory estimate, which model and cases this runs on.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllama_export.engines.onnxrt import OnnxRuntimeBackend
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.family import family_of
from mllama_export.graphs.progress import bar, step
from mllama_export.graphs.spec import check_forward

from .onnx_export import example_inputs
from .options import BuildOptions

# The same arithmetic in two runtimes: float32 differs in rounding only; 16-bit rounds each op.
# fp8 graphs are checked by exporter/fp8_check.py instead, with every FP8 GEMM output shared.
CHECK_REL_L2 = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 6e-2}

# bf16 graphs are checked structurally only (onnx.checker, the contract's names and dims)
BF16_UNCHECKED = {
    "ran": False,
    "reason": "ONNX Runtime's CPU provider has no bfloat16 kernels; checked structurally only",
}

Cases = Mapping[str, tuple[tuple[int, dict[str, int]], ...]]  # graph -> ((seed, sizes), ...)
Expected = dict[str, list[tuple[np.ndarray, ...]]]


class Reference:
    """The PyTorch side of the check. It holds its model only until ``release``: the model
    and ONNX Runtime's copy of the weights must not share the memory."""

    def __init__(self, load: Callable[[], torch.nn.Module] | None = None, model=None):
        self._load, self._model = load, model

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            if self._load is None:
                raise RuntimeError("the reference model was released")
            self._model = self._load()
        return self._model

    def release(self) -> None:
        self._model = self._load = None
        gc.collect()


def graph_modules(config: Any) -> dict[str, type[torch.nn.Module]]:
    """Graph name -> module class, of ``config``'s family, in the order they run."""
    return family_of(config).part("graph_modules")


def inputs(graph_cls, config: Any, dtype: torch.dtype, seed: int, sizes: dict) -> dict:
    """The case's inputs by name: both runtimes bind them by name, never by position."""
    args = example_inputs(graph_cls.INPUTS, config, dtype, sizes, seed=seed)
    return {s.name: a for s, a in zip(graph_cls.INPUTS, args, strict=True)}


def reference_outputs(
    reference: Reference, config: Any, options: BuildOptions, cases: Cases
) -> Expected:
    """Phase 1: PyTorch's outputs of every graph on every case, then the model is released."""
    expected: Expected = {}
    for name, graph_cls in graph_modules(config).items():
        graph = graph_cls(reference.model)
        check_forward(graph, graph_cls.INPUTS)
        expected[name] = []
        for seed, sizes in bar(
            cases[name], len(cases[name]), f"PyTorch runs the {name} graph", "cases"
        ):
            args = inputs(graph_cls, config, options.dtype, seed, sizes)
            with torch.inference_mode():
                outs = graph(**args)
            expected[name].append(tuple(o.numpy() for o in outs))
            del args, outs
    reference.release()
    return expected


def compare_onnx(
    onnx_dir: Path, expected: Expected, config: Any, options: BuildOptions, cases: Cases
) -> dict[str, dict]:
    """Phase 2: each graph in ONNX Runtime on the same inputs, against PyTorch's outputs."""
    # FP8 Q/DQ runs on ONNX Runtime only at graph optimization BASIC (exporter/fp8.py)
    optimization = "basic" if options.precision == "fp8" else "all"
    checks = {}
    for name, graph_cls in graph_modules(config).items():
        path = onnx_dir / f"{name}.onnx"
        with step(f"ONNX Runtime loads {path.name}"):
            backend = OnnxRuntimeBackend(
                path, graph_cls.INPUTS, graph_cls.OUTPUTS, optimization=optimization
            )
        worst: dict[str, float] = {}
        runs = zip(cases[name], expected[name], strict=True)
        for (seed, sizes), want in bar(
            runs, len(cases[name]), f"ONNX Runtime runs {path.name}", "cases"
        ):
            args = inputs(graph_cls, config, options.dtype, seed, sizes)
            feed = {k: a.numpy() for k, a in args.items()}
            actual = backend.infer(feed)
            for spec, ref in zip(graph_cls.OUTPUTS, want, strict=True):
                err = rel_l2(actual[spec.name], ref)
                worst[spec.name] = max(worst.get(spec.name, 0.0), err)
            del args, feed, actual
        del backend
        gc.collect()
        checks[name] = _judged(path, worst, options.precision)
        checks[name]["cases"] = [sizes for _, sizes in cases[name]]
    return checks


def _judged(path: Path, worst: dict[str, float], precision: str) -> dict:
    limit = CHECK_REL_L2[precision]
    failed = {k: v for k, v in worst.items() if not v <= limit}
    if failed:
        raise MllamaExportError(
            f"the exported {path.name} disagrees with PyTorch: relative L2 {failed} "
            f"above {limit} ({precision}); the ONNX export is wrong, please report it"
        )
    return {
        "ran": True,
        "limit_rel_l2": limit,
        "outputs": {k: {"rel_l2": v} for k, v in worst.items()},
    }


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def check_graphs(
    reference: Reference, onnx_dir: Path, config: Any, options: BuildOptions, cases: Cases
) -> dict[str, dict]:
    """Both phases: PyTorch's outputs (the model then released), then ONNX Runtime's."""
    expected = reference_outputs(reference, config, options, cases)
    return compare_onnx(onnx_dir, expected, config, options, cases)
