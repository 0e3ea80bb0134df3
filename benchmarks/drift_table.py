"""The per-stage-kind drift table of docs/accuracy.md, from a gate's drift.json.

    python benchmarks/drift_table.py out/tiny-fp8/drift/drift.json

One row per kind of stage (vision, prefill, decode): how many stages, rel_l2 max (median),
cosine min, top-1 min / pooled (agreeing rows over all rows of that kind), top-5 min, KL max.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from mllama_export.graphs.contract import GRAPH_NAMES


def _kind(stage: str) -> str:
    return "decode" if stage.startswith("decode[") else stage


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def table(drift: dict) -> str:
    rows: dict[str, list[dict]] = {}
    for case in drift["cases"]:
        for stage in case["stages"]:
            rows.setdefault(_kind(stage["stage"]), []).append(stage["metrics"])
    lines = [
        "| stage | stages | rel_l2 max (median) | cosine min | top-1 min / pooled | top-5 min "
        "| KL max (nats) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, ms in sorted(rows.items(), key=lambda kv: GRAPH_NAMES.index(kv[0])):
        rel = [m["rel_l2"] for m in ms]
        cells = [
            f"{_fmt(max(rel))} ({_fmt(statistics.median(rel))})",
            f"{min(m['cosine'] for m in ms):.4f}",
        ]
        if ms[0]["rows"] is None:
            cells += ["–", "–", "–"]
        else:
            n = sum(m["rows"] for m in ms)
            pooled = sum(m["top1_agreement"] * m["rows"] for m in ms) / n
            top1 = min(m["top1_agreement"] for m in ms)
            cells += [
                f"{top1:.2f} / {pooled:.3f}",
                f"{min(m['top5_agreement'] for m in ms):.3f}",
                _fmt(max(m["kl_divergence"] for m in ms)),
            ]
        lines.append(f"| {kind} | {len(ms)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{drift['summary']}\n"


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"{path}\n\n{table(json.loads(Path(path).read_text()))}")
