"""The drift report's picture, ``drift.png``: rel_l2 per stage and decode step for each case,
on a log axis with its limit, and below it the share of its limit each stage used.

matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

from .thresholds import fmt_value


class Report(Protocol):
    """What the picture reads of a validate.report.DriftReport (which imports this module
    to draw itself, so this one cannot import it)."""

    results: list
    precision: str
    thresholds_version: str
    reference: str
    backend: str

    @property
    def passed(self) -> bool: ...

    @property
    def worst(self): ...

    def by_case(self) -> dict[str, list]: ...

    def limits_seen(self) -> dict[str, dict[str, float]]: ...


def _decode_ticks(n_steps: int) -> list[int]:
    if n_steps <= 0:
        return []
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000):
        if n_steps / step <= 16:
            break
    return list(range(0, n_steps, step))


def plot_rel_l2(rep: Report, path: str | Path) -> Path:
    """rel_l2 per stage and decode step for each case, on a log axis, with the limit.

    Left panel: the vision (cross-attention K/V) and prefill stages; right panel: the
    decode steps. Failing stages (any metric) are ringed in red; exact zeros and
    NaN/inf are drawn at the bottom/top edge and named in the legend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    by_case = rep.by_case()
    limits = rep.limits_seen()
    finite_pos = [
        r.metrics.rel_l2
        for r in rep.results
        if math.isfinite(r.metrics.rel_l2) and r.metrics.rel_l2 > 0
    ]
    limit_vals = [lim["rel_l2"] for lim in limits.values() if lim.get("rel_l2", 0) > 0]
    span = finite_pos + limit_vals
    floor_y = min(span) / 10 if span else 1e-8  # where exact zeros are drawn
    top_y = max(span) * 10 if span else 1.0  # where NaN/inf are drawn
    steps = [r.where.step for r in rep.results if r.where.kind == "decode"]
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
            group, step = r.where.order
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


def _plot_budget(rep: Report, ax_pre, ax_dec, jitter: float, ms: float) -> None:
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
            group, step = r.where.order
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
