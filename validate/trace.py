"""What one side of the gate computed for one case, for any family (validate/gate.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Trace:
    """What one side computed for one case."""

    # the family's stages before prefill (Mllama's "vision": the cross-attention K/V of the
    # real tiles, [real tiles, 2 (K, V), L_x, H_kv, patches, Dh]); empty: none ran
    stages: dict[str, np.ndarray]
    prefill: np.ndarray  # [real prompt positions, V]
    steps: list[np.ndarray] = field(default_factory=list)  # [B, V] per decode step
    tokens: np.ndarray | None = None  # [steps + 1, B]: tokens[i] is the input of decode step i


class Reference(Protocol):
    """One side the gate judges against: a family's "reference" part, or the graphs'.

    A family's reference part is a class with `from_weights(manifest, weights, stack)` (the
    artifacts' manifest, validate/gate.py ReferenceWeights, an ExitStack for temporary
    files) returning an object with this protocol."""

    label: str

    def trace(self, case: Any, steps: int) -> Trace: ...
