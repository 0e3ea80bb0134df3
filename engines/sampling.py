"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mllama_export.errors import MllamaExportError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # nucleus: the fewest likeliest tokens holding this much probability
    seed: int | None = None

    def __post_init__(self):
        problems = []
        t, k, p = self.temperature, self.top_k, self.top_p
        if (
            not isinstance(t, int | float)
            or isinstance(t, bool)
            or not (math.isfinite(t) and t >= 0)
        ):
            problems.append(f"temperature {t!r} (expected a finite number >= 0; 0 is greedy)")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            problems.append(f"top_k {k!r} (expected an integer >= 0; 0 keeps every token)")
        if not isinstance(p, int | float) or isinstance(p, bool) or not 0 < p <= 1:
            problems.append(f"top_p {p!r} (expected 0 < top_p <= 1; 1 keeps every token)")
        seed = self.seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            problems.append(f"seed {seed!r} (expected an integer >= 0, or none)")
        if problems:
            raise MllamaExportError("invalid sampling: " + "; ".join(problems))


class TokenPicker:
    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        # logits: [B, V] -> [B] int64
        if np.isnan(logits).any():
            raise MllamaExportError(
                "the model's logits hold NaN, so no token can be chosen; the artifacts are "
                "broken: judge them with `mllama-export validate`"
            )
        s = self.sampling
        if s.temperature == 0:
            return logits.argmax(-1).astype(np.int64)
        scaled = logits.astype(np.float64) / s.temperature
        return np.array([self._sample(row) for row in scaled], dtype=np.int64)

    def _sample(self, logits: np.ndarray) -> int:
        order = np.argsort(-logits, kind="stable")
        if self.sampling.top_k:
            order = order[: self.sampling.top_k]
        top = logits[order[0]]
        if not np.isfinite(top):  # all -inf (or a +inf): the likeliest token, as greedy would
            return int(order[0])
        probs = np.exp(logits[order] - top)
        probs /= probs.sum()
        # The smallest prefix whose mass reaches top_p; the top token always stays, and a sum
        # that rounds just below 1 never asks for more tokens than there are.
        keep = min(int(np.searchsorted(np.cumsum(probs), self.sampling.top_p)) + 1, len(order))
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(keep, p=probs)])
