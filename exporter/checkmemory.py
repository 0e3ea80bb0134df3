"""The memory a build's check against PyTorch may plan with, for any family's "check" part
(Mllama's: exporter/checkplan.py): what the machine has, the share of it a build plans with,
the libraries' own constants, the estimate and the decision between the whole model, a
reduced copy and a refusal, and the refusals' words.

The constants are the libraries' (torch, onnx, ONNX Runtime, onnxscript), not a model's: each
family's part gives its own graphs' parameters, activations, reduced copy and check cases
(a `Sizing`), which the estimate and the decision combine with them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch

from mllama_export.errors import MllamaExportError

from .check import GB, CheckPlan
from .weightfile import graph_names

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


@dataclass(frozen=True)
class GraphSizes:
    """Parameters each graph computes with, from a model on the meta device."""

    total: int  # every parameter of the model
    largest: int  # the largest single tensor
    computed: dict[str, int]  # per graph, the parameters it multiplies with
    gathered: dict[str, int]  # per graph, the parameters it only gathers rows from


def parameter_sizes(
    model: torch.nn.Module,
    graph_modules: Mapping[str, Callable[[Any], torch.nn.Module]],
    embedding: str = "text.embed_tokens.weight",
) -> GraphSizes:
    """The sizes of ``model`` (on the meta device) and of each graph's share of it, a graph
    being ``graph_modules[name](model)``; ``embedding`` is only gathered from."""
    params = dict(model.named_parameters())
    computed, gathered = {}, {}
    for name, cls in graph_modules.items():
        used = {ours for ours in graph_names(cls(model), model).values() if ours in params}
        computed[name] = sum(params[n].numel() for n in used if n != embedding)
        gathered[name] = params[embedding].numel() if embedding in used else 0
    return GraphSizes(
        sum(p.numel() for p in params.values()),
        max(p.numel() for p in params.values()),
        computed,
        gathered,
    )


# graph, sizes, itemsize, onnxruntime -> activation bytes of one run of that graph
RunBytes = Callable[[str, dict[str, int], int, bool], int]


def estimate(
    sizes: GraphSizes, run_bytes: RunBytes, precision: str, cases: dict[str, list[dict[str, int]]]
) -> MemoryEstimate:
    """Peak memory of the export and of the check on ``cases`` (per graph), for a model of
    ``sizes`` whose runs take ``run_bytes``."""
    from .options import PRECISION_TORCH_DTYPES

    itemsize = PRECISION_TORCH_DTYPES[precision].itemsize
    export = EXPORT_LIBRARY_BYTES + int(sizes.largest * itemsize * EXPORT_LARGEST)
    if not any(cases.values()):
        return MemoryEstimate(export, 0, 0)
    torch_runs = max(run_bytes(g, c, itemsize, False) for g, cs in cases.items() for c in cs)
    reference = LIBRARY_BYTES + sizes.total * itemsize + torch_runs
    per_graph = [
        max(
            sizes.computed[g] * ORT_LOAD_BYTES,
            sizes.computed[g] * ORT_WEIGHT_BYTES + max(run_bytes(g, c, itemsize, True) for c in cs),
        )
        for g, cs in cases.items()
        if cs
    ]
    return MemoryEstimate(export, reference, LIBRARY_BYTES + max(per_graph))


@dataclass(frozen=True)
class Sizing:
    """A family's side of the estimate and of the decision."""

    graph_sizes: Callable[[Any], GraphSizes]  # config -> its model's GraphSizes
    run_bytes: Callable[[Any, str, dict[str, int], int, bool], int]  # config, then RunBytes
    reduced_copy: Callable[[Any], Any]  # config -> the family's reduced copy (.config)
    graphs: tuple[str, ...]
    cases: tuple[dict[str, int], ...]  # the first always runs, the second where it fits
    # what does not fit even on the reduced copy, in the refusal's words
    cause: str = "one image's vision attention at this width"

    def estimate(
        self,
        config,
        precision: str,
        cases: dict[str, list[dict[str, int]]],
        sizes: GraphSizes | None = None,
    ) -> MemoryEstimate:
        sizes = sizes or self.graph_sizes(config)
        return estimate(sizes, partial(self.run_bytes, config), precision, cases)


def plan_check(options, config, available: int, sizing: Sizing) -> CheckPlan:
    """The deepest check of ``config`` that fits in ``available`` bytes, as
    ``options.check_depth`` allows; refused up front when none fits."""
    if options.precision == "bf16":
        from .verify import BF16_UNCHECKED

        export = sizing.estimate(config, "bf16", {})
        return CheckPlan("none", BF16_UNCHECKED["reason"], None, {}, export, available)
    # FP8's check model is float16 outside its FP8 layers (calibration, layer by layer, is
    # refused apart: refuse_calibration), so it is planned as fp16
    precision = "fp16" if options.precision == "fp8" else options.precision
    room = budget(available)
    full_cases, full_cost = _fit_cases(sizing, config, precision, room)
    if options.check_depth in ("auto", "full") and full_cases is not None:
        why = "it fits in memory" if options.check_depth == "auto" else "--check-depth full"
        return CheckPlan("full", why, config, full_cases, full_cost, available)
    copy = sizing.reduced_copy(config)
    small_cases, small_cost = _fit_cases(sizing, copy.config, precision, room)
    if options.check_depth == "full" or small_cases is None:
        refuse(options, full_cost, small_cost, available, sizing.cause)
    why = (
        "--check-depth reduced"
        if options.check_depth == "reduced"
        else f"the whole model needs {full_cost.peak / GB:.1f} GB for the check"
    )
    return CheckPlan("reduced", why, copy.config, small_cases, small_cost, available, copy)


def _fit_cases(sizing: Sizing, config, precision: str, room: int):
    """The first case of every graph, plus the second where the estimate still fits
    (cheapest graph first); None when the first cases alone do not fit."""
    sizes = sizing.graph_sizes(config)
    cases = {g: [(1, sizing.cases[0])] for g in sizing.graphs}

    def cost(chosen) -> MemoryEstimate:
        plain = {g: [c for _, c in cs] for g, cs in chosen.items()}
        return sizing.estimate(config, precision, plain, sizes)

    if cost(cases).peak > room:
        return None, cost(cases)
    for graph in ("decode", "prefill", "vision"):
        trial = {**cases, graph: [*cases[graph], (2, sizing.cases[1])]}
        if cost(trial).peak <= room:
            cases = trial
    return {g: tuple(cs) for g, cs in cases.items()}, cost(cases)


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


def refuse_calibration(needed: int, available: int) -> None:
    """FP8 calibration runs layer by layer, so what it needs (``needed``: its largest unit in
    float32 and the headroom) does not grow with depth; refused up front only where that does
    not fit in ``available`` bytes."""
    if needed > available:
        raise MllamaExportError(
            f"--precision fp8 calibrates one layer at a time in float32, which needs "
            f"{needed / GB:.1f} GB (the largest layer and the libraries), and "
            f"{have(available)}; build bf16 or fp16 here, or build fp8 on a machine with "
            "that much memory"
        )
