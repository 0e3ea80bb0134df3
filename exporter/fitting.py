"""Which text engine fits, and the largest batch and sequence each fits: the planner's
arithmetic (exporter/plan.py) searched over one limit at a time, beside TensorRT's per-tensor
cap (engines/profiles.py), which `build` applies before any work."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mllama_export.engines.profiles import TEXT_ENGINES, Limits, largest_fitting
from mllama_export.graphs.config import MllamaConfig

from .plan import GB, plan

_MOST_BATCH = 1 << 16


@dataclass(frozen=True)
class Fitting:
    text_engine: str
    total_bytes: int
    fits: bool
    batch: int  # the largest max_batch at this max_seq_len that fits in memory (0: none)
    seq_len: int  # the largest max_seq_len at this max_batch that fits in memory (0: none)
    batch_cap: int  # ... that also keeps every engine tensor under TensorRT's cap
    seq_len_cap: int


def fitting(
    config: MllamaConfig,
    precision: str,
    max_batch: int,
    max_seq_len: int,
    max_images: int,
    gpu: str,
    text_engine: str,
    tiles: int | None = None,
) -> Fitting:
    """The plan at these limits, and the largest batch and max_seq_len (each with the other
    limits kept) that fit the GPU's memory, then also TensorRT's per-tensor cap."""

    def fits(b: int, s: int) -> bool:
        return plan(config, precision, b, s, max_images, gpu, None, tiles, text_engine).fits

    here = plan(
        config, precision, max_batch, max_seq_len, max_images, gpu, None, tiles, text_engine
    )
    batch = _largest(lambda b: fits(b, max_seq_len), _MOST_BATCH)
    seq = _largest(lambda s: fits(max_batch, s), config.text.max_position_embeddings)

    def capped(limit: str, value: int) -> int:
        if value == 0:
            return 0
        limits = replace(Limits(max_batch, max_seq_len, max_images), **{limit: value})
        return largest_fitting(config, limits, limit, text_engine=text_engine) or 0

    return Fitting(
        text_engine, here.total_bytes, here.fits, batch, seq,
        capped("max_batch", batch), capped("max_seq_len", seq),
    )  # fmt: skip


def _largest(ok, most: int) -> int:
    """The largest n in 1..most with ok(n) (ok is monotonic: true, then false); 0 if none."""
    if not ok(1):
        return 0
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def compare_text_engines(
    config: MllamaConfig,
    precision: str,
    max_batch: int,
    max_seq_len: int,
    max_images: int,
    gpu: str,
    tiles: int | None = None,
) -> str:
    """Both text engines side by side: total, fits or not, the limits each fits."""
    lines = ["", "text engines (build --text-engine):"]
    for engine in TEXT_ENGINES:
        f = fitting(config, precision, max_batch, max_seq_len, max_images, gpu, engine, tiles)
        lines.append(
            f"  {engine:<7}{f.total_bytes / GB:8.2f} GB, {'fits' if f.fits else 'does NOT fit'}; "
            f"largest batch at seq {max_seq_len}: {f.batch} (TensorRT's tensor cap: "
            f"{f.batch_cap}); longest seq at batch {max_batch}: {f.seq_len} (cap: "
            f"{f.seq_len_cap})"
        )
    return "\n".join(lines)
