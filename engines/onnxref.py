"""ONNX's own reference implementation as a backend: every dtype, bfloat16 included.

ONNX Runtime's CPU provider has no bfloat16 kernels, so a bf16 artifact cannot run there;
onnx.reference (numpy, op by op as the ONNX specification defines them, with ml_dtypes'
bfloat16) runs the very same files. It is slow, which the tiny preset and the accuracy gate
can afford: it exists so that bf16 artifacts are judged on a machine without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.spec import TensorSpec

from .backend import check_feed


class OnnxReferenceBackend:
    name = "onnx-reference"

    def __init__(
        self, path: str | Path, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]
    ):
        from onnx.reference import ReferenceEvaluator

        self.inputs, self.outputs, self.label = inputs, outputs, Path(path).stem
        try:
            self.session = ReferenceEvaluator(str(path))  # external data loaded beside it
        except Exception as err:  # onnx raises its own untyped errors for unreadable models
            raise MllamaExportError(f"onnx.reference cannot load {path}: {err}") from err
        self._names = [s.name for s in outputs]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.label, self.inputs, feed)
        outs = self.session.run(self._names, feed)
        return dict(zip(self._names, outs, strict=True))
