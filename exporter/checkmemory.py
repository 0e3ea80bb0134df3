"""The memory a build's check against PyTorch may plan with, for any family's "check" part
(Mllama's: exporter/checkplan.py): what the machine has, the share of it a build plans with,
the libraries' own constants, the estimate's shape, and the refusals' words.

The constants are the libraries' (torch, onnx, ONNX Runtime, onnxscript), not a model's: each
family's part adds its own activations on top of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from mllama_export.errors import MllamaExportError

from .check import GB

# Constants measured on this project's machine at the 11B width (tests/test_checkplan.py holds
# the estimate against measured peaks on small widths, benchmarks/export_memory.py at 11B):
# the Python, torch, onnx and ONNX Runtime libraries once loaded,
LIBRARY_BYTES = int(0.5 * GB)  # 0.45 to 0.5 GB, by the versions installed
# ONNX Runtime holds every weight it computes with as float32 (16-bit ones cast once at load,
# when the original and the cast are both in memory); a weight only gathered from (the
# embedding) stays memory-mapped,
ORT_WEIGHT_BYTES = 4
ORT_LOAD_BYTES = 6
# PyTorch's CPU GEMMs repack the weight they multiply (the largest: lm_head), per itemsize,
TORCH_REPACK = {2: 0.7, 4: 0.2}
# and the export (with onnxscript's libraries on top) holds the largest tensor whole (lm_head,
# transposed) plus one block of rows. The libraries' share is 0.54 to 0.62 GB, by the
# versions installed (a fresh CI environment measured the most),
EXPORT_LIBRARY_BYTES = int(0.62 * GB)
EXPORT_LARGEST = 1.15
# What the check may plan to use of the memory available: the estimate is within about 10%
# of the measured peaks, and other processes' memory moves while a build runs.
BUDGET_SHARE, BUDGET_RESERVE = 0.9, int(1 * GB)


def budget(available: int) -> int:
    return int(available * BUDGET_SHARE) - BUDGET_RESERVE


def available_memory() -> int:
    """What can be allocated without swapping: MemAvailable, or less where a cgroup limit
    (a container's memory.max) leaves less."""
    found = _meminfo_available()
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            found = min(found, int(limit) - used)
    except (OSError, ValueError):
        pass
    return found


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of each phase of a build, libraries included."""

    export: int  # the streaming export: one tensor (or block) at a time
    reference: int  # the check's PyTorch phase: the model and its largest run
    onnxruntime: int  # the check's ONNX Runtime phase: the largest graph and its largest run

    @property
    def peak(self) -> int:
        return max(self.export, self.reference, self.onnxruntime)

    def describe(self) -> str:
        return (
            f"{self.peak / GB:.1f} GB (export {self.export / GB:.1f}, PyTorch "
            f"{self.reference / GB:.1f}, ONNX Runtime {self.onnxruntime / GB:.1f})"
        )


def refuse(
    options,
    full_cost,
    small_cost,
    available: int,
    cause: str = "one image's vision attention at this width",
) -> NoReturn:
    """The check's refusal: --check-depth full that does not fit, or not even the copy."""
    room = have(available)
    if options.check_depth == "full":
        raise MllamaExportError(
            f"--check-depth full needs {full_cost.describe()} for the check against PyTorch "
            f"and {room}; use --check-depth auto (a reduced copy needs "
            f"{small_cost.peak / GB:.1f} GB) or free memory"
        )
    raise MllamaExportError(
        f"the check against PyTorch needs {small_cost.describe()} even on a reduced copy of "
        f"the model ({cause}), and {room}; free memory, "
        "or build --precision bf16, which ONNX Runtime cannot run on the CPU and so is "
        "checked structurally only"
    )


def have(available: int) -> str:
    """What the machine has and what a build plans with, for refusals."""
    return (
        f"this machine has {available / GB:.1f} GB available (a build plans with "
        f"{max(budget(available), 0) / GB:.1f} GB of it)"
    )


# -- FP8 calibration ---------------------------------------------------------------------------
#
# What it holds besides the cases' activations: the largest unit in float32 (at 11B the
# embedding or lm_head), the small tensors, the libraries (exporter/layerwise.py).
CALIBRATION_HEADROOM = 2 << 30
