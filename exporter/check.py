"""What the build's check against PyTorch runs on, for any family.

A family's "check" part (Mllama's: exporter/checkplan.py) plans it from a memory estimate and
may run it on a reduced copy of the model; its API, as the build calls it: ``available_memory()``,
``plan_check(options, config, available) -> CheckPlan``, ``refuse_fp8_calibration(options,
config, available)`` and ``write_reduced_checkpoint(checkpoint, copy, folder) -> folder``. A
family without one gets `whole_model_check`: the whole model, one case per graph, no memory
estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.family import Family

GB = 1e9


@dataclass(frozen=True)
class CheckPlan:
    depth: str  # "full", "reduced" or "none"
    reason: str  # why this depth, in words
    config: Any  # what the check runs on: the model's, or the copy's (None: no check)
    cases: dict[str, tuple[tuple[int, dict[str, int]], ...]] = field(default_factory=dict)
    estimate: Any = None  # the family's memory estimate: .peak, .describe(); None: none
    available: int = 0
    copy: Any = None  # the family's reduced copy: .describe(), .kept_amax(amax)

    def label(self) -> str:
        """The manifest's ``depth`` of each graph's check."""
        return "full" if self.depth == "full" else f"{self.copy.describe()} ({self.reason})"

    def summary(self) -> str:
        if self.depth == "none":
            return f"no numeric check: {self.reason}"
        runs = ", ".join(f"{g} {len(c)}" for g, c in self.cases.items())
        what = "the whole model" if self.depth == "full" else "a " + self.copy.describe()
        if self.estimate is None:
            return f"checking against PyTorch on {what}; {runs} case(s); no memory estimate"
        return (
            f"checking against PyTorch on {what}; {runs} case(s); memory estimate "
            f"{self.estimate.describe()}; {self.available / GB:.1f} GB available"
        )


def whole_model_check(family: Family, options, config: Any) -> CheckPlan:
    """The check of a family without a "check" part: the whole model, at sizes unlike the
    traced ones (exporter/family_build.py), whatever the memory."""
    from .family_build import example_sizes
    from .verify import BF16_UNCHECKED

    if options.precision == "bf16":
        return CheckPlan("none", BF16_UNCHECKED["reason"], None)
    if options.check_depth == "reduced":
        raise MllamaExportError(
            f"--check-depth reduced: the {family.title} family has no reduced copy to check; "
            "use --check-depth auto or full"
        )
    traced = example_sizes(family)
    sizes = {d: 1 if d == "batch" else n - 1 for d, n in traced.items()}
    cases = {name: ((1, sizes),) for name in family.graphs}
    why = "it has no memory estimate" if options.check_depth == "auto" else "--check-depth full"
    return CheckPlan("full", why, config, cases)
