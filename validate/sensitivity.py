"""Per-layer FP8 sensitivity: how much of the accuracy gate's fp8 budget each layer uses alone.

For every FP8 layer of an fp8 artifact folder (or those matching ``layers``), the float32
PyTorch reference runs with that one layer quantized as the artifacts quantize it (their
calibrated input amax, per-output-channel FP8 weights) and the accuracy gate judges it
against the unquantized reference: the same cases, teacher forcing and fp8 thresholds as
``mllama-export validate``. The float32 base keeps float16 rounding out of the figure, so
each row is the layer's own FP8 error. A last run quantizes all the listed layers at once.

A layer's ``budget`` is the largest share of any fp8 limit it uses (``Check.ratio``: 1 is at
the limit). The top of the ranking is what ``build --fp8-exclude`` should keep in 16 bits
when a build fails the gate, typically the vision encoder's layers under ``--fp8-vision``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mllama_export.engines.runner import Limits
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.progress import bar, info, step

from .evalset import EvalCase, build_evalset
from .gate import GraphsReference, Trace, judge, resolve_checkpoint
from .report import DriftReport, jsonable, stage_kind
from .thresholds import fmt_value, load_thresholds

__all__ = ["LayerSensitivity", "SensitivityReport", "run_sensitivity"]


@dataclass(frozen=True)
class LayerSensitivity:
    """The gate's report on the float32 reference with only ``layers`` in FP8."""

    label: str  # a layer name, or "all N layers"
    report: DriftReport

    @property
    def budget(self) -> float:
        worst = self.report.worst
        return 0.0 if worst is None else worst.check.ratio

    def extreme(self, metric: str, kind: str, lowest: bool = False) -> float | None:
        """The largest (``lowest``: smallest) ``metric`` over the stages of ``kind``."""
        values = [
            getattr(r.metrics, metric) for r in self.report.results if stage_kind(r.stage) == kind
        ]
        values = [v for v in values if v is not None]
        if not values:
            return None
        return min(values) if lowest else max(values)

    def to_dict(self) -> dict[str, object]:
        worst = self.report.worst
        return {
            "layer": self.label,
            "budget": self.budget,
            "passed": self.report.passed,
            "vision_rel_l2": self.extreme("rel_l2", "vision"),
            "logits_rel_l2": self.extreme("rel_l2", "logits"),
            "top1_min": self.extreme("top1_agreement", "logits", lowest=True),
            "kl_max": self.extreme("kl_divergence", "logits"),
            "worst": worst.to_dict() if worst is not None else None,
        }


@dataclass
class SensitivityReport:
    layers: list[LayerSensitivity]  # most sensitive first
    combined: LayerSensitivity | None  # every listed layer at once (None: not run yet)
    thresholds_version: str
    extra: dict[str, object] = field(default_factory=dict)
    total: int | None = None  # layers asked for; more than len(layers) while it runs

    @property
    def complete(self) -> bool:
        return self.combined is not None and len(self.layers) == (self.total or len(self.layers))

    def summary_line(self) -> str:
        if not self.layers:
            return "FP8 sensitivity: no layer finished yet"
        top = self.layers[0]
        head = (
            f"FP8 sensitivity of {len(self.layers)} layer(s): most sensitive {top.label} "
            f"(budget {top.budget:.2f})"
        )
        if not self.complete:
            return f"{head}; INCOMPLETE, {len(self.layers)} of {self.total} layers finished"
        return (
            f"{head}; all together budget {self.combined.budget:.2f} "
            f"({'pass' if self.combined.report.passed else 'FAIL'}, fp8 thresholds "
            f"{self.thresholds_version})"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "summary": self.summary_line(),
            "complete": self.complete,
            "thresholds_version": self.thresholds_version,
            "combined": None if self.combined is None else self.combined.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_markdown(self) -> str:
        return _markdown(self)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``sensitivity.json`` and ``sensitivity.md`` into ``out_dir``, each atomically
        (a reader never sees half a file, an interruption never leaves one)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "sensitivity.json", "md": out / "sensitivity.md"}
        text = json.dumps(jsonable(self.to_dict()), indent=2, allow_nan=False)
        _write_atomically(paths["json"], text + "\n")
        _write_atomically(paths["md"], self.to_markdown())
        return paths


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class _Cached:
    """The unquantized reference's traces, computed once: every layer is judged against them."""

    def __init__(self, reference: GraphsReference, cases: Sequence[EvalCase], steps: int):
        self.label = reference.label
        self.traces: dict[str, Trace] = {c.name: reference.trace(c, steps) for c in cases}

    def trace(self, case: EvalCase, steps: int) -> Trace:
        return self.traces[case.name]


@contextmanager
def _in_fp8(model, amax: dict[str, float]) -> Iterator[None]:
    """``model`` with the named Linears replaced by float32-based FP8Linears, restored after."""
    import torch

    from mllama_export.graphs.quant import FP8Linear, replace_module

    swapped = []
    try:
        for name, value in amax.items():
            linear = model.get_submodule(name)
            swapped.append(
                (name, replace_module(model, name, FP8Linear(linear, value, torch.float32)))
            )
        yield
    finally:
        for name, original in reversed(swapped):
            replace_module(model, name, original)


def _fp8_layers(manifest: dict, patterns: Sequence[str]) -> dict[str, float]:
    from mllama_export.graphs.quant import match_layers

    quantization = manifest.get("quantization")
    if manifest.get("precision") != "fp8" or not quantization:
        raise MllamaExportError(
            f"FP8 sensitivity needs artifacts built with --precision fp8; these are "
            f"{manifest.get('precision')!r}"
        )
    amax = {name: float(e["input_amax"]) for name, e in quantization["layers"].items()}
    if not amax:
        raise MllamaExportError("these fp8 artifacts hold no FP8 layer; nothing to rank")
    if patterns:
        chosen = match_layers(list(amax), patterns, "--layers", also=_vision_linears(manifest))
        amax = {name: value for name, value in amax.items() if name in chosen}
    return amax


def _vision_linears(manifest: dict) -> list[str]:
    """Every layer an --fp8-vision build would quantize, from a model on the meta device."""
    import torch

    from mllama_export.graphs.config import MllamaConfig
    from mllama_export.graphs.model import MllamaModel
    from mllama_export.graphs.quant import quantizable_linears

    with torch.device("meta"):
        model = MllamaModel(MllamaConfig.from_hf_dict(manifest["model"]["config"]))
    return quantizable_linears(model, vision=True)


def run_sensitivity(
    artifacts: str | Path,
    layers: Sequence[str] = (),
    thresholds: str | Path | None = None,
    cases: Sequence[EvalCase] | None = None,
    steps: int = 8,
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    prefill_chunk: int | None = None,
) -> SensitivityReport:
    """Ranks the FP8 layers of ``artifacts`` (those matching the glob ``layers``; default
    all) by the share of the fp8 budget each uses alone. One gate run per layer, in PyTorch
    on the CPU; the artifacts' own graphs are not run (``validate`` judges those).

    With ``out_dir`` the report is rewritten there (atomically) after every layer, marked
    incomplete until the last run, so that an interrupted run keeps its finished rows.
    ``prefill_chunk``: the quantized side prefills through the step graph in chunks."""
    from mllama_export.exporter.manifest import read_manifest

    start = time.perf_counter()
    manifest = read_manifest(artifacts)
    amax = _fp8_layers(manifest, layers)
    limits_file = load_thresholds(thresholds)
    limits = Limits(**manifest["limits"])
    source = resolve_checkpoint(manifest, checkpoint)
    with step(f"loading the float32 reference from {source.describe()}"):
        model = source.load(manifest["model"]["xattn_mask"])
    if cases is None:
        cases = build_evalset(source.config, limits, steps)
    with step(f"the unquantized reference on {len(cases)} case(s)"):
        reference = _Cached(GraphsReference(model, limits), cases, steps)

    def gate(label: str, chosen: dict[str, float]) -> LayerSensitivity:
        with _in_fp8(model, chosen):
            runner = GraphsReference(model, limits).runner  # graph modules see the swap
            report = judge(
                runner, reference, cases, steps, limits_file, "fp8", f"FP8 {label}", False,
                prefill_chunk,
            )  # fmt: skip
        return LayerSensitivity(label, report)

    extra = {
        "artifacts": str(artifacts),
        "reference_weights": source.describe(),
        "cases": [c.name for c in cases],
        "steps": steps,
        "prefill_chunk": prefill_chunk,
        "thresholds_source": limits_file.source,
    }
    report = SensitivityReport([], None, limits_file.version, extra, total=len(amax))
    for name, value in bar(amax.items(), len(amax), "FP8 layers, one at a time", "layers"):
        report.layers.append(gate(name, {name: value}))
        report.layers.sort(key=lambda r: (-r.budget, r.label))
        info(f"{name}: budget {next(r for r in report.layers if r.label == name).budget:.3f}")
        if out_dir is not None:
            report.write(out_dir)
    with step(f"all {len(amax)} layers at once"):
        report.combined = gate(f"all {len(amax)} layers", amax)
    report.extra["seconds"] = round(time.perf_counter() - start, 2)
    if out_dir is not None:
        report.write(out_dir)
    return report


def _row(rank: str, s: LayerSensitivity) -> str:
    cells = [
        s.extreme("rel_l2", "vision"),
        s.extreme("rel_l2", "logits"),
        s.extreme("top1_agreement", "logits", lowest=True),
        s.extreme("kl_divergence", "logits"),
    ]
    worst = s.report.worst
    where = f"{worst.check.metric} at {worst.stage} of `{worst.case}`" if worst else "–"
    values = " | ".join("–" if v is None else fmt_value(v) for v in cells)
    return f"| {rank} | `{s.label}` | {s.budget:.3f} | {values} | {where} |"


def _markdown(rep: SensitivityReport) -> str:
    extra = rep.extra
    lines = [
        "# FP8 sensitivity",
        "",
        f"`{rep.summary_line()}`",
        "",
        f"Artifacts `{extra.get('artifacts', '?')}`; reference weights "
        f"{extra.get('reference_weights', '?')}; {len(extra.get('cases', []))} case(s), "
        f"{extra.get('steps', '?')} teacher-forced decode steps; fp8 thresholds "
        f"{rep.thresholds_version}.",
        "",
        "Each row: the float32 PyTorch reference with only that layer in FP8 (the artifacts' "
        "calibrated input scale, per-channel FP8 weights), judged by the accuracy gate "
        "against the unquantized reference. budget = the largest share of any fp8 limit the "
        "layer uses (1 = at the limit; rel_l2, cosine and KL on one scale, see "
        "docs/accuracy.md). The top rows are the candidates for `build --fp8-exclude`.",
        "",
        "| rank | layer | budget | vision rel_l2 | logits rel_l2 | top1 min | KL max | worst |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
        *([_row("all", rep.combined)] if rep.combined is not None else []),
    ]
    lines += [_row(str(i), s) for i, s in enumerate(rep.layers, start=1)]
    if not rep.layers:
        return "\n".join(lines) + "\n"
    top = rep.layers[0].label
    lines += [
        "",
        f"To keep the most sensitive layer in 16 bits: `mllama-export build ... "
        f"--precision fp8 --fp8-exclude '{top}'` (glob patterns; repeatable).",
        "",
    ]
    return "\n".join(lines)
