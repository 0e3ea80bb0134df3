"""Drift report: per-stage verdicts of one backend against the reference.

Stages are named ``vision`` (cross-attention K/V), ``prefill`` (prompt logits) and
``decode[i]`` (the logits of decode step ``i``); within a case they are ordered in
that sequence, which is the order drift propagates in, so the first failing stage
is where drift starts.

``DriftReport.write(out_dir)`` writes ``drift.json`` (machine-readable; NaN/inf are
written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` to stay strict JSON),
``drift.md`` (a table per case) and ``drift.png`` (rel_l2 per stage and decode step).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .metrics import Metrics
from .plot import plot_rel_l2
from .thresholds import Check, Thresholds, fmt_value

__all__ = [
    "DriftReport",
    "Stage",
    "StageResult",
    "Worst",
    "stage_order",
]

REPORT_FORMAT = 1
STAGE_KINDS = ("vision", "prefill", "decode")  # the order drift propagates in


class Stage(NamedTuple):
    """Where in a case a result stands: ``vision``, ``prefill`` or ``decode[step]``."""

    kind: str
    step: int | None = None  # decode only: the generated token's index

    def __str__(self) -> str:
        return self.kind if self.step is None else f"{self.kind}[{self.step}]"

    @classmethod
    def parse(cls, name: str) -> Stage:
        if name in ("vision", "prefill"):
            return cls(name)
        head, bracket, rest = name.partition("[")
        digits = rest.removesuffix("]")
        if head == "decode" and bracket and rest.endswith("]") and digits.isdecimal():
            return cls("decode", int(digits))
        raise ValueError(f"unknown stage name {name!r}; expected vision, prefill or decode[<step>]")

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: vision, prefill, decode[0], decode[1], ..."""
        return (STAGE_KINDS.index(self.kind), self.step or 0)

    @property
    def thresholds_kind(self) -> str:
        """The thresholds kind of the stage: ``vision`` or ``logits``."""
        return "vision" if self.kind == "vision" else "logits"


def stage_order(stage: str) -> tuple[int, int]:
    """Sort key of a stage name: vision, prefill, decode[0], decode[1], ..."""
    return Stage.parse(stage).order


@dataclass(frozen=True)
class StageResult:
    """One stage of one case: its metrics and the limits they broke (truthy = passed).

    ``checks`` holds every limit held against the metrics, passing ones included
    (used to find the worst metric of a passing report); ``violations`` are the
    failing ones.
    """

    stage: str
    case: str
    metrics: Metrics
    violations: tuple[Check, ...] = ()
    checks: tuple[Check, ...] = ()

    def __post_init__(self) -> None:
        Stage.parse(self.stage)  # validates the name
        object.__setattr__(self, "violations", tuple(self.violations))
        object.__setattr__(self, "checks", tuple(self.checks))

    @classmethod
    def judged(
        cls, stage: str, case: str, metrics: Metrics, thresholds: Thresholds, precision: str
    ) -> StageResult:
        checks = thresholds.checks(metrics, precision, Stage.parse(stage).thresholds_kind)
        return cls(stage, case, metrics, tuple(c for c in checks if not c.passed), tuple(checks))

    @property
    def where(self) -> Stage:
        return Stage.parse(self.stage)

    @property
    def kind(self) -> str:
        """The thresholds kind: ``vision`` or ``logits``."""
        return self.where.thresholds_kind

    @property
    def passed(self) -> bool:
        return not self.violations

    def __bool__(self) -> bool:
        return self.passed

    def worst_check(self) -> Check | None:
        pool = self.violations or self.checks
        return max(pool, key=lambda c: c.ratio, default=None)

    def verdict(self) -> str:
        if self.passed:
            return "pass"
        return "FAIL: " + "; ".join(
            f"{v.metric} {fmt_value(v.value)} {'>' if v.bound == 'max' else '<'} "
            f"{fmt_value(v.limit)}"
            for v in self.violations
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "stage": self.stage,
            "kind": self.kind,
            "passed": self.passed,
            "metrics": self.metrics.to_dict(),
            "violations": [v.to_dict() for v in self.violations],
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class Worst:
    """The metric that used the largest share of its limit, and where."""

    result: StageResult
    check: Check

    @property
    def stage(self) -> str:
        return self.result.stage

    @property
    def case(self) -> str:
        return self.result.case

    def describe(self) -> str:
        c = self.check
        return (
            f"{c.metric}={fmt_value(c.value)} (limit {c.op} {fmt_value(c.limit)}) "
            f"at {self.stage} of case {self.case!r}"
        )

    def to_dict(self) -> dict[str, object]:
        return {"stage": self.stage, "case": self.case, **self.check.to_dict()}


@dataclass
class DriftReport:
    """All stage results of one backend/precision run; truthy when every stage passed.

    An empty report does not pass: nothing was verified.
    """

    results: list[StageResult]
    precision: str
    thresholds_version: str
    reference: str
    backend: str
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.results = list(self.results)
        seen: set[tuple[str, str]] = set()
        for r in self.results:
            self._check_new(r, seen)

    @staticmethod
    def _check_new(r: StageResult, seen: set[tuple[str, str]]) -> None:
        key = (r.case, r.stage)
        if key in seen:
            raise ValueError(f"stage {r.stage} of case {r.case!r} is in the report twice")
        seen.add(key)

    def add(self, result: StageResult) -> StageResult:
        self._check_new(result, {(r.case, r.stage) for r in self.results})
        self.results.append(result)
        return result

    def record(
        self, stage: str, case: str, metrics: Metrics, thresholds: Thresholds
    ) -> StageResult:
        """Judge ``metrics`` with ``thresholds`` at this report's precision and add it."""
        return self.add(StageResult.judged(stage, case, metrics, thresholds, self.precision))

    # -- structure -------------------------------------------------------------------

    @property
    def cases(self) -> list[str]:
        """Case names in the order they first appear."""
        return list(dict.fromkeys(r.case for r in self.results))

    def by_case(self) -> dict[str, list[StageResult]]:
        """Each case's results in stage order (vision, prefill, decode[0..n])."""
        out: dict[str, list[StageResult]] = {c: [] for c in self.cases}
        for r in self.results:
            out[r.case].append(r)
        for rs in out.values():
            rs.sort(key=lambda r: r.where.order)
        return out

    def ordered(self) -> list[StageResult]:
        return [r for rs in self.by_case().values() for r in rs]

    # -- verdicts --------------------------------------------------------------------

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(self.results)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failures(self) -> list[StageResult]:
        return [r for r in self.ordered() if not r]

    @property
    def first_failure(self) -> StageResult | None:
        """The earliest failing stage: cases in order, within a case vision, prefill, decode[0..n]."""
        fails = self.failures
        return fails[0] if fails else None

    def first_failure_by_case(self) -> dict[str, StageResult | None]:
        return {c: next((r for r in rs if not r), None) for c, rs in self.by_case().items()}

    @property
    def worst(self) -> Worst | None:
        """The check that used the largest share of its limit (see ``Check.ratio``).

        When the report fails, only failing checks are considered; ties go to the
        earliest stage.
        """
        candidates: list[tuple[StageResult, Check]] = []
        failing = not self.passed and bool(self.failures)
        for r in self.ordered():
            pool = r.violations if failing else (r.checks or r.violations)
            candidates.extend((r, c) for c in pool)
        if not candidates:
            return None
        return Worst(*max(candidates, key=lambda rc: rc[1].ratio))  # max keeps the first of ties

    def summary_line(self) -> str:
        head = (
            f"{'PASS' if self.passed else 'FAIL'} {self.precision} {self.backend} vs "
            f"{self.reference} (thresholds {self.thresholds_version})"
        )
        if not self.results:
            return f"{head}: no stages were compared"
        n_cases, n_stages = len(self.cases), len(self.results)
        worst = self.worst
        worst_txt = f"worst {worst.describe()}" if worst is not None else "no limits checked"
        if self.passed:
            return f"{head}: {n_cases} case(s), {n_stages} stage(s) within limits; {worst_txt}"
        first = self.first_failure
        assert first is not None
        return (
            f"{head}: {len(self.failures)} of {n_stages} stage(s) over limits in "
            f"{n_cases} case(s); {worst_txt}; drift starts at {first.stage} of case {first.case!r}"
        )

    # -- output ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        first = self.first_failure
        worst = self.worst
        return {
            "format": REPORT_FORMAT,
            "passed": self.passed,
            "summary": self.summary_line(),
            "precision": self.precision,
            "thresholds_version": self.thresholds_version,
            "reference": self.reference,
            "backend": self.backend,
            "first_failure": {"stage": first.stage, "case": first.case}
            if first is not None
            else None,
            "worst": worst.to_dict() if worst is not None else None,
            "cases": [
                {
                    "case": case,
                    "passed": all(rs),
                    "stages": [r.to_dict() for r in rs],
                }
                for case, rs in self.by_case().items()
            ],
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(jsonable(self.to_dict()), indent=indent, allow_nan=False)

    def to_markdown(self) -> str:
        return _markdown(self)

    def limits_seen(self) -> dict[str, dict[str, float]]:
        """The limit of each (kind, metric) as carried by the checks in the report."""
        out: dict[str, dict[str, float]] = {}
        for r in self.results:
            for c in (*r.checks, *r.violations):
                if c.metric != "nonfinite":
                    out.setdefault(r.kind, {}).setdefault(c.metric, c.limit)
        return dict(sorted(out.items(), key=lambda kv: kv[0] != "vision"))

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``drift.json``, ``drift.md`` and ``drift.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "drift.json", "md": out / "drift.md", "png": out / "drift.png"}
        paths["json"].write_text(self.to_json() + "\n", encoding="utf-8")
        paths["md"].write_text(self.to_markdown(), encoding="utf-8")
        plot_rel_l2(self, paths["png"])
        return paths


def jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


# -- markdown ----------------------------------------------------------------------------


def _md_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _cell(x: float | None) -> str:
    return "–" if x is None else fmt_value(x)


def _markdown(rep: DriftReport) -> str:
    verdict = "PASS" if rep.passed else "FAIL"
    first = rep.first_failure
    lines = [
        f"# Drift report: {verdict}",
        "",
        f"`{_md_escape(rep.summary_line())}`",
        "",
        "| | |",
        "|---|---|",
        f"| backend | {_md_escape(rep.backend)} |",
        f"| reference | {_md_escape(rep.reference)} |",
        f"| precision | {_md_escape(rep.precision)} |",
        f"| thresholds version | {_md_escape(rep.thresholds_version)} |",
        f"| cases / stages | {len(rep.cases)} / {len(rep.results)} |",
        "| first failure | "
        + (f"{first.stage} of case `{_md_escape(first.case)}`" if first is not None else "none")
        + " |",
        "",
        "Metrics: rel_l2 = ‖actual − ref‖₂ / ‖ref‖₂; cosine of the flattened tensors; "
        "top1 = share of rows whose argmax agrees; top5 = share of rows whose reference "
        "top-1 token is in the actual top 5; kl = mean KL(ref ‖ actual) in nats; "
        "max_abs = largest |actual − ref|. Vision stages have no token metrics (–).",
        "",
    ]
    ties = rep.extra.get("top1_ties")
    if ties:
        lines += [
            "Top-1 counts a flip as a tie when the reference scores the actual's choice "
            f"within max({fmt_value(ties['tie_tolerance'])}, "
            f"{fmt_value(ties['tie_margin'])} × RMS of the reference row) of its best.",
            "",
        ]
    firsts = rep.first_failure_by_case()
    for case, rs in rep.by_case().items():
        ff = firsts[case]
        status = "pass" if ff is None else f"FAIL, drift starts at {ff.stage}"
        lines += [
            f"## Case `{_md_escape(case)}`: {status}",
            "",
            "| stage | rel_l2 | cosine | top1 | top5 | kl (nats) | max_abs | verdict |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rs:
            m = r.metrics
            verdict_txt = r.verdict()
            if not r.passed:
                verdict_txt = f"**{_md_escape(verdict_txt)}**"
            lines.append(
                f"| {r.stage} | {_cell(m.rel_l2)} | {_cell(m.cosine)} | "
                f"{_cell(m.top1_agreement)} | {_cell(m.top5_agreement)} | "
                f"{_cell(m.kl_divergence)} | {_cell(m.max_abs_error)} | {verdict_txt} |"
            )
        lines.append("")

    limits = rep.limits_seen()
    if limits:
        cols = [
            ("rel_l2", "max rel_l2"),
            ("cosine", "min cosine"),
            ("top1_agreement", "min top1"),
            ("top5_agreement", "min top5"),
            ("kl_divergence", "max kl"),
            ("max_abs_error", "max abs"),
        ]
        lines += [
            f"## Limits ({_md_escape(rep.precision)}, thresholds {rep.thresholds_version})",
            "",
            "| kind | " + " | ".join(title for _, title in cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for kind, vals in limits.items():
            lines.append(
                f"| {kind} | " + " | ".join(_cell(vals.get(metric)) for metric, _ in cols) + " |"
            )
        lines.append("")
    return "\n".join(lines)
