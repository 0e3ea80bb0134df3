"""ONNX Runtime backend: one InferenceSession per graph, CPU or CUDA provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.contract import TensorSpec

from .backend import check_feed


def providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise MllamaExportError(
                f"ONNX Runtime's CUDA provider is not available here; providers: {available}"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise MllamaExportError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        device: str = "cpu",
        optimization: str = "all",
    ):
        import onnxruntime as ort

        self.inputs, self.outputs, self.label = inputs, outputs, Path(path).stem
        options = ort.SessionOptions()
        # FP8 Q/DQ graphs must stay at BASIC: higher levels fuse Q/DQ into int8-only kernels.
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers(device))
        except Exception as err:  # ORT raises its own untyped errors for unreadable models
            raise MllamaExportError(f"ONNX Runtime cannot load {path}: {err}") from err
        self._names = [s.name for s in outputs]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.label, self.inputs, feed)
        outs = self.session.run(self._names, feed)
        return dict(zip(self._names, outs, strict=True))
