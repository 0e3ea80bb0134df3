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
import re
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import Metrics
from .thresholds import Check, Thresholds, fmt_value

__all__ = [
    "DriftReport",
    "StageResult",
    "Worst",
    "plot_rel_l2",
    "stage_kind",
    "stage_order",
]

REPORT_FORMAT = 1
_STAGE = re.compile(r"^(?:vision|prefill|decode\[(\d+)\])$")


def stage_order(stage: str) -> tuple[int, int]:
    """Sort key: vision, prefill, decode[0], decode[1], ..."""
    m = _STAGE.match(stage)
    if m is None:
        raise ValueError(
            f"unknown stage name {stage!r}; expected vision, prefill or decode[<step>]"
        )
    if stage == "vision":
        return (0, 0)
    if stage == "prefill":
        return (1, 0)
    return (2, int(m.group(1)))


def stage_kind(stage: str) -> str:
    """The thresholds kind of a stage: ``vision`` or ``logits``."""
    return "vision" if stage_order(stage)[0] == 0 else "logits"


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
        stage_order(self.stage)  # validates the name
        object.__setattr__(self, "violations", tuple(self.violations))
        object.__setattr__(self, "checks", tuple(self.checks))

    @classmethod
    def judged(
        cls, stage: str, case: str, metrics: Metrics, thresholds: Thresholds, precision: str
    ) -> StageResult:
        checks = thresholds.checks(metrics, precision, stage_kind(stage))
        return cls(stage, case, metrics, tuple(c for c in checks if not c.passed), tuple(checks))

    @property
    def kind(self) -> str:
        return stage_kind(self.stage)

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
            rs.sort(key=lambda r: stage_order(r.stage))
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

    limits = _limits_seen(rep)
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


def _limits_seen(rep: DriftReport) -> dict[str, dict[str, float]]:
    """The limit of each (kind, metric) as carried by the checks in the report."""
    out: dict[str, dict[str, float]] = {}
    for r in rep.results:
        for c in (*r.checks, *r.violations):
            if c.metric != "nonfinite":
                out.setdefault(r.kind, {}).setdefault(c.metric, c.limit)
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "vision"))


# -- plot --------------------------------------------------------------------------------


def _decode_ticks(n_steps: int) -> list[int]:
    if n_steps <= 0:
        return []
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000):
        if n_steps / step <= 16:
            break
    return list(range(0, n_steps, step))


def plot_rel_l2(rep: DriftReport, path: str | Path) -> Path:
    """rel_l2 per stage and decode step for each case, on a log axis, with the limit.

    Left panel: the vision (cross-attention K/V) and prefill stages; right panel: the
    decode steps. Failing stages (any metric) are ringed in red; exact zeros and
    NaN/inf are drawn at the bottom/top edge and named in the legend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    by_case = rep.by_case()
    limits = _limits_seen(rep)
    finite_pos = [
        r.metrics.rel_l2
        for r in rep.results
        if math.isfinite(r.metrics.rel_l2) and r.metrics.rel_l2 > 0
    ]
    limit_vals = [lim["rel_l2"] for lim in limits.values() if lim.get("rel_l2", 0) > 0]
    span = finite_pos + limit_vals
    floor_y = min(span) / 10 if span else 1e-8  # where exact zeros are drawn
    top_y = max(span) * 10 if span else 1.0  # where NaN/inf are drawn
    steps = [stage_order(r.stage)[1] for r in rep.results if stage_order(r.stage)[0] == 2]
    n_steps = max(steps) + 1 if steps else 0

    fig = Figure(figsize=(12, 8.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    (ax_pre, ax_dec), (bud_pre, bud_dec) = fig.subplots(
        2,
        2,
        sharey="row",
        sharex="col",
        gridspec_kw={"width_ratios": [1, 4.5], "height_ratios": [3, 2], "wspace": 0.02},
    )
    ax_dec.set_yscale("log")

    n_cases = max(len(by_case), 1)
    jitter = min(0.3 / n_cases, 0.08)
    ms = 6 if n_steps <= 40 else 3
    ring = 170 if n_steps <= 40 else 70
    handles: list[Line2D] = []
    any_fail = any_zero = any_inf = False
    for i, (case, rs) in enumerate(by_case.items()):
        color, marker = f"C{i % 10}", "osD^vPX<>h"[(i // 10) % 10]
        pre_x, pre_y, dec_x, dec_y = [], [], [], []
        for r in rs:
            v = r.metrics.rel_l2
            y = floor_y if v == 0 else (v if math.isfinite(v) else top_y)
            any_zero |= v == 0
            any_inf |= not math.isfinite(v)
            group, step = stage_order(r.stage)
            if group < 2:
                ax, x = ax_pre, group + (i - (n_cases - 1) / 2) * jitter
                pre_x.append(x)
                pre_y.append(y)
            else:
                ax, x = ax_dec, step
                dec_x.append(x)
                dec_y.append(y)
            if not r.passed:
                any_fail = True
                ax.scatter([x], [y], s=ring, facecolors="none", edgecolors="red", lw=2, zorder=4)
        if pre_x:
            ax_pre.plot(pre_x, pre_y, ls="none", color=color, marker=marker, ms=8, zorder=3)
        if dec_x:
            ax_dec.plot(dec_x, dec_y, color=color, marker=marker, ms=ms, lw=1.5, zorder=3)
        handles.append(Line2D([], [], color=color, marker=marker, lw=1.5, label=f"case {case}"))

    limit_style = {"color": "black", "ls": "--", "lw": 1.3, "zorder": 2}
    v_lim = limits.get("vision", {}).get("rel_l2")
    l_lim = limits.get("logits", {}).get("rel_l2")
    if v_lim is not None and v_lim == l_lim:
        ax_pre.axhline(v_lim, **limit_style)
        ax_dec.axhline(v_lim, **limit_style)
        label = f"limit: rel_l2 ≤ {fmt_value(v_lim)} ({rep.precision})"
        handles.append(Line2D([], [], **limit_style, label=label))
    else:
        if v_lim is not None:
            ax_pre.hlines(v_lim, -0.45, 0.45, **limit_style)
        if l_lim is not None:
            ax_pre.hlines(l_lim, 0.55, 1.45, **{**limit_style, "color": "dimgray"})
            ax_dec.axhline(l_lim, **{**limit_style, "color": "dimgray"})
        for lim, name, color in ((v_lim, "vision", "black"), (l_lim, "logits", "dimgray")):
            if lim is not None:
                label = f"{name} limit: rel_l2 ≤ {fmt_value(lim)} ({rep.precision})"
                handles.append(Line2D([], [], **{**limit_style, "color": color}, label=label))
    if any_fail:
        handles.append(
            Line2D([], [], ls="none", marker="o", ms=11, mfc="none", mec="red", mew=2,
                   label="stage over a limit (any metric)")
        )  # fmt: skip
    if any_zero:
        for ax in (ax_pre, ax_dec):
            ax.axhline(floor_y, color="gray", lw=0.8, ls=":")
        handles.append(
            Line2D(
                [], [], color="gray", ls=":", label=f"exact match (0) drawn at {fmt_value(floor_y)}"
            )
        )
    if any_inf:
        for ax in (ax_pre, ax_dec):
            ax.axhline(top_y, color="red", lw=0.8, ls=":")
        handles.append(
            Line2D([], [], color="red", ls=":", label=f"NaN/inf drawn at {fmt_value(top_y)}")
        )

    _plot_budget(rep, bud_pre, bud_dec, jitter, ms)
    bud_pre.set_xticks([0, 1], ["vision\n(K/V)", "prefill"])
    ax_pre.set_xlim(-0.6, 1.6)
    bud_pre.set_xlabel("stage")
    ax_pre.set_ylim(floor_y / 3, top_y * 3)
    ax_pre.set_ylabel("relative L2 error ‖actual − ref‖₂ / ‖ref‖₂\n(dimensionless, log scale)")
    ticks = _decode_ticks(n_steps)
    ax_dec.set_xticks(ticks, [str(t) for t in ticks])
    ax_dec.set_xlim(-0.6, max(n_steps - 1, 0) + 0.6)
    bud_dec.set_xlabel("decode step (logits of generated token i)")
    ax_dec.tick_params(axis="y", labelleft=False)
    if not n_steps:
        ax_dec.text(0.5, 0.5, "no decode steps", transform=ax_dec.transAxes, ha="center")
    for ax in (ax_pre, ax_dec):
        ax.grid(True, which="major", axis="y", alpha=0.5)
        ax.grid(True, which="minor", axis="y", alpha=0.15)
        ax.grid(True, which="major", axis="x", alpha=0.25)
    verdict = "PASS" if rep.passed else "FAIL"
    worst = rep.worst
    decided = "" if worst is None else f"\ndecided by {worst.describe()}"
    fig.suptitle(
        f"{verdict}: drift of {rep.backend} vs {rep.reference}, {rep.precision} "
        f"(thresholds {rep.thresholds_version}){decided}",
        fontsize=12,
        color="black" if rep.passed else "darkred",
    )
    ax_dec.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False
    )
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def _plot_budget(rep: DriftReport, ax_pre, ax_dec, jitter: float, ms: float) -> None:
    """Per stage, the share of its limit used by the metric nearest its limit (the one that
    decides the verdict; 1 = at the limit), with that metric named at the worst point."""
    by_case = rep.by_case()
    n_cases = max(len(by_case), 1)
    shown = []
    for i, (_, rs) in enumerate(by_case.items()):
        color, marker = f"C{i % 10}", "osD^vPX<>h"[(i // 10) % 10]
        pre, dec = ([], []), ([], [])
        for r in rs:
            pool = r.violations or r.checks
            if not pool:
                continue
            check = max(pool, key=lambda c: c.ratio)
            y = min(max(check.ratio, 1e-6), 1e6)
            group, step = stage_order(r.stage)
            x = group + (i - (n_cases - 1) / 2) * jitter if group < 2 else step
            target = pre if group < 2 else dec
            target[0].append(x)
            target[1].append(y)
            shown.append((y, x, group < 2, check.metric))
        ax_pre.plot(*pre, ls="none", color=color, marker=marker, ms=8, zorder=3)
        ax_dec.plot(*dec, color=color, marker=marker, ms=ms, lw=1.5, zorder=3)
    top = max((y for y, *_ in shown), default=1.0)
    if top > 3:  # far over the limit: a log scale keeps the passing stages readable
        ax_dec.set_yscale("log")
    else:
        ax_dec.set_ylim(0, max(1.1, 1.1 * top))
    for ax in (ax_pre, ax_dec):
        ax.axhline(1.0, color="red", ls="--", lw=1.3, zorder=2)
        ax.grid(True, which="major", axis="y", alpha=0.5)
    ax_pre.set_ylabel("share of its limit used\n(the metric nearest its limit)")
    if shown:
        y, x, left, metric = max(shown)
        (ax_pre if left else ax_dec).annotate(
            metric, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9
        )
    ax_dec.text(1.0, 1.0, " limit", color="red", transform=ax_dec.get_yaxis_transform(),
                va="center", fontsize=9)  # fmt: skip
