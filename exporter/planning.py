"""What every family's planner (its "plan" part) shares: the GPUs planned against, the
decimal GB the tables print, the check of a positive limit, how a time prints, and the search
for the largest limit that still fits.

Mllama's planner is exporter/plan.py (arithmetic) and exporter/fits.py (the command's
request and what-would-fit search); another family's reads these figures from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllama_export.errors import MllamaExportError

GB = 1e9


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    memory_bytes: int  # datasheet capacity read as decimal GB: a budget a little under the real one
    bandwidth: float  # bytes/s
    bf16_flops: float  # dense tensor-core FLOP/s (fp16 is the same)
    fp8_flops: float  # dense
    source: str


GPUS: dict[str, Gpu] = {
    "h100": Gpu(
        key="h100",
        name="H100 SXM",
        memory_bytes=80 * 10**9,
        bandwidth=3.35e12,
        bf16_flops=989e12,
        fp8_flops=1979e12,
        source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: 80GB HBM3, 3.35TB/s; "
        "BF16/FP16 Tensor Core 1,979 TFLOPS and FP8 3,958 TFLOPS are with sparsity, dense is half",
    ),
    "h200": Gpu(
        key="h200",
        name="H200 SXM",
        memory_bytes=141 * 10**9,
        bandwidth=4.8e12,
        bf16_flops=989e12,
        fp8_flops=1979e12,
        source="NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: 141GB HBM3e, 4.8TB/s; "
        "BF16/FP16 Tensor Core 1,979 TFLOPS and FP8 3,958 TFLOPS are with sparsity, dense is half",
    ),
}


def largest(ok, most: int) -> int:
    """The largest n in 1..most with ok(n), ok being true then false as n grows; 0 if none."""
    low, high = 0, most  # ok at low (0: none found yet), not known above
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ok(mid) else (low, mid - 1)
    return low


def positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MllamaExportError(f"{name} must be a positive integer, got {value!r}")
    return value


def duration(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 10 else f"{seconds:.1f} s"
