"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllama_export.errors import MllamaExportError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise MllamaExportError(
                f"invalid sampling {self}: expected temperature >= 0, top_k >= 0, 0 < top_p <= 1"
            )


class TokenPicker:
    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        # logits: [B, V] -> [B] int64
        s = self.sampling
        if s.temperature == 0:
            return logits.argmax(-1).astype(np.int64)
        scaled = logits.astype(np.float64) / s.temperature
        return np.array([self._sample(row) for row in scaled], dtype=np.int64)

    def _sample(self, logits: np.ndarray) -> int:
        order = np.argsort(-logits, kind="stable")
        if self.sampling.top_k:
            order = order[: self.sampling.top_k]
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        keep = int(np.searchsorted(np.cumsum(probs), self.sampling.top_p) + 1)
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(keep, p=probs)])
