"""Mllama's FP8 calibration (exporter/calibration.py holds the family-independent part).

:func:`calibrate_streamed` (what `build` runs) never holds the model: every case runs at once,
layer by layer, each layer read from the memory-mapped checkpoint and dropped
(exporter/layerwise.py), and the scales are those of :func:`calibrate` on the whole model,
bit for bit where the BLAS is reproducible (tests/test_fp8_streamed.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from mllama_export.graphs.limits import Limits
from mllama_export.graphs.weights import Checkpoint

from .calibration import CALIBRATION_STEPS, calibrate, calibrate_layerwise
from .layerwise import LazyModel

__all__ = ["CALIBRATION_STEPS", "calibrate", "calibrate_streamed"]


def calibrate_streamed(
    checkpoint: Checkpoint,
    semantics: str,
    names: Sequence[str],
    cases: Sequence,
    limits: Limits,
    steps: int = CALIBRATION_STEPS,
) -> dict[str, float]:
    """:func:`calibrate` without the model in memory: the float32 model of ``checkpoint``
    layer by layer, every case at once (exporter/layerwise.py). Same scales (bit for bit
    with a reproducible BLAS: tests/test_fp8_streamed.py)."""
    return calibrate_layerwise(LazyModel(checkpoint, semantics), names, cases, limits, steps)
