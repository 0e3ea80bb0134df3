"""The check inside `build`: ONNX Runtime on the exported file against the PyTorch graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from mllama_export.engines.onnxrt import OnnxRuntimeBackend
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig

from .onnx_export import example_inputs
from .options import BuildOptions

# Shapes unlike the traced ones, so that a dim frozen by mistake shows up here.
CHECK_SIZES = (
    {"batch": 1, "num_images": 1, "sequence": 5, "num_logits": 1, "past_sequence": 9},
    {"batch": 3, "num_images": 2, "sequence": 4, "num_logits": 4, "past_sequence": 6},
)
# The same arithmetic in two runtimes: float32 differs in rounding only; 16-bit rounds each op.
# fp8 graphs are checked by exporter/fp8_check.py instead, with every FP8 GEMM output shared.
LIMITS = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 6e-2}


# bf16 graphs are checked structurally only (onnx.checker, the contract's names and dims)
BF16_UNCHECKED = {
    "ran": False,
    "reason": "ONNX Runtime's CPU provider has no bfloat16 kernels; checked structurally only",
}


def verify_graph(graph, path: Path, config: MllamaConfig, options: BuildOptions) -> dict:
    if options.precision == "bf16":
        return dict(BF16_UNCHECKED)
    # FP8 Q/DQ runs on ONNX Runtime only at graph optimization BASIC (exporter/fp8.py)
    optimization = "basic" if options.precision == "fp8" else "all"
    backend = OnnxRuntimeBackend(path, graph.INPUTS, graph.OUTPUTS, optimization=optimization)
    worst: dict[str, float] = {}
    for seed, sizes in enumerate(CHECK_SIZES):
        args = example_inputs(graph.INPUTS, config, options.dtype, sizes, seed=seed + 1)
        with torch.inference_mode():
            expected = graph(*args)
        feed = {s.name: a.numpy() for s, a in zip(graph.INPUTS, args, strict=True)}
        actual = backend.infer(feed)
        for spec, ref in zip(graph.OUTPUTS, expected, strict=True):
            err = _rel_l2(actual[spec.name], ref.float().numpy())
            worst[spec.name] = max(worst.get(spec.name, 0.0), err)
    limit = LIMITS[options.precision]
    result = {
        "ran": True,
        "limit_rel_l2": limit,
        "outputs": {k: {"rel_l2": v} for k, v in worst.items()},
    }
    failed = {k: v for k, v in worst.items() if not v <= limit}
    if failed:
        raise MllamaExportError(
            f"the exported {path.name} disagrees with PyTorch: relative L2 {failed} "
            f"above {limit} ({options.precision}); the ONNX export is wrong, please report it"
        )
    return result


def _rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def verify_reduced(
    checkpoint: Path,
    config: MllamaConfig,
    options: BuildOptions,
    scratch: Path,
    progress,
    input_amax: dict[str, float] | None = None,
) -> dict[str, dict]:
    """The check on a reduced-depth copy of the model (its first layers, the checkpoint's own
    weights), exported by the same streaming path into ``scratch``, which is removed after.
    FP8 (``input_amax``: the full model's calibrated scales) quantizes the copy's layers with
    the full model's scales and runs the FP8 check (exporter/fp8_check.py) on it."""
    from mllama_export.graphs.weights import Checkpoint, load_model

    from .streaming import GRAPHS, StreamingExport, describe_reduced, reduced_config

    small = reduced_config(config)
    depth = describe_reduced(small, config, options)
    progress(f"checking the graphs against PyTorch on a {depth}")
    scratch.mkdir()
    weights = Checkpoint(checkpoint, small, subset=True)
    amax = _kept_layers(small, options, input_amax) if options.precision == "fp8" else None
    try:
        StreamingExport(weights, options, amax).export_all(scratch)
        if amax is not None:
            from .fp8 import check_fp8_graphs, load_fp8_model

            model = load_fp8_model(
                weights, options.xattn_mask, amax, options.dtype, options.fp8_weights
            )
            checks = check_fp8_graphs(model, scratch, options, progress)
            return {name: {**check, "depth": depth} for name, check in checks.items()}
        model = load_model(checkpoint, options.xattn_mask, options.dtype, config=small)
        return {
            name: {
                **verify_graph(cls(model), scratch / f"{name}.onnx", small, options),
                "depth": depth,
            }
            for name, cls in GRAPHS.items()
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _kept_layers(small: MllamaConfig, options: BuildOptions, amax) -> dict[str, float]:
    """The full model's calibrated FP8 layers that the reduced copy holds."""
    from mllama_export.graphs.model import MllamaModel

    with torch.device("meta"):
        names = {n for n, _ in MllamaModel(small, options.xattn_mask).named_modules()}
    return {name: value for name, value in (amax or {}).items() if name in names}
