"""Per-layer FP8 sensitivity: how much of the accuracy gate's fp8 budget each layer uses alone.

For every FP8 layer of an fp8 artifact folder (or those matching ``layers``), the float32
PyTorch reference runs with that one layer quantized as the artifacts quantize it (their
calibrated input amax and weight scheme) and the accuracy gate judges it against the
unquantized reference: the same cases, teacher forcing and fp8 thresholds as
``mllama-export validate``. The float32 base keeps float16 rounding out of the figure, so
each row is the layer's own FP8 error. A last run quantizes all the listed layers at once.

A layer's ``budget`` is the largest share of any fp8 limit it uses (``Check.ratio``: 1 is at
the limit). The top of the ranking is what ``build --fp8-exclude`` should keep in 16 bits
when a build fails the gate. When all the layers together use more than SUGGEST_BUDGET, the
report also searches the fewest top-ranked layers whose exclusion brings them under it,
and suggests those ``--fp8-exclude`` patterns.

Everything runs on the checkpoint layer by layer (exporter/layerwise.py): every (variant,
case) run is a job, so each graph call reads each layer once for a whole pass of variants,
and the memory is one layer plus the jobs' activations at any depth.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.family import Family, family_of_config
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.progress import bar, step

from .gate import Trace, judge, resolve_checkpoint, trace_runner
from .report import DriftReport, jsonable
from .thresholds import fmt_value, load_thresholds

__all__ = ["LayerSensitivity", "SensitivityReport", "fp8_advice", "run_sensitivity"]

# the suggested exclusions bring the remaining layers (in a float32 base) under this share of
# the fp8 limits: the artifacts add float16 rounding, which FP8 amplifies
SUGGEST_BUDGET = 0.8
VARIANTS_PER_PASS = 8  # variants whose cases run together, layer by layer


@dataclass(frozen=True)
class LayerSensitivity:
    """The gate's report on the float32 reference with only ``layers`` in FP8."""

    label: str  # a layer name, or "all N layers"
    report: DriftReport

    @property
    def budget(self) -> float:
        worst = self.report.worst
        return 0.0 if worst is None else worst.check.ratio

    @property
    def continuous(self) -> float:
        """The largest share of the rel_l2, cosine and KL limits: the tie-break where the
        token metrics saturate the budget (a single-row stage's top-5 is 0 or 1)."""
        ratios = [
            c.ratio
            for r in self.report.results
            for c in r.checks
            if c.metric in ("rel_l2", "cosine", "kl_divergence")
        ]
        return max(ratios, default=0.0)

    def rank_key(self) -> tuple[float, float, str]:
        return (-self.budget, -self.continuous, self.label)

    def extreme(self, metric: str, kind: str, lowest: bool = False) -> float | None:
        """The largest (``lowest``: smallest) ``metric`` over the stages of ``kind``."""
        values = [getattr(r.metrics, metric) for r in self.report.results if r.kind == kind]
        values = [v for v in values if v is not None]
        if not values:
            return None
        return min(values) if lowest else max(values)

    def to_dict(self) -> dict[str, object]:
        worst = self.report.worst
        return {
            "layer": self.label,
            "budget": self.budget,
            "continuous_budget": self.continuous,
            "passed": self.report.passed,
            "vision_rel_l2": self.extreme("rel_l2", "vision"),
            "logits_rel_l2": self.extreme("rel_l2", "logits"),
            "top1_min": self.extreme("top1_agreement", "logits", lowest=True),
            "kl_max": self.extreme("kl_divergence", "logits"),
            "worst": worst.to_dict() if worst is not None else None,
        }


@dataclass(frozen=True)
class Suggestion:
    """The fewest top-ranked layers whose exclusion brings the rest under the target."""

    exclude: list[str]  # layer names, most sensitive first
    patterns: list[str]  # the same as --fp8-exclude glob patterns
    remaining: LayerSensitivity | None  # the gate on the layers left in FP8 (None: none left)
    target: float = SUGGEST_BUDGET

    @property
    def reached(self) -> bool:
        return self.remaining is None or self.remaining.budget <= self.target

    def to_dict(self) -> dict[str, object]:
        return {
            "exclude": self.exclude,
            "patterns": self.patterns,
            "target_budget": self.target,
            "remaining": None if self.remaining is None else self.remaining.to_dict(),
            "reached": self.reached,
        }


@dataclass
class SensitivityReport:
    layers: list[LayerSensitivity]  # most sensitive first
    combined: LayerSensitivity | None  # every listed layer at once (None: not run yet)
    thresholds_version: str
    extra: dict[str, object] = field(default_factory=dict)
    suggestion: Suggestion | None = None  # when the combined budget is over SUGGEST_BUDGET
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
            "suggestion": None if self.suggestion is None else self.suggestion.to_dict(),
            **({"extra": self.extra} if self.extra else {}),
        }

    def rebuild_command(self) -> str | None:
        """`mllama-export build` of the same artifacts with the suggested exclusions."""
        if self.suggestion is None or not self.suggestion.exclude:
            return None
        return rebuild_command(self.extra.get("build_options", {}), self.suggestion.patterns)

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

    def __init__(self, label: str, traces: dict[str, Trace]):
        self.label, self.traces = label, traces

    def trace(self, case: Any, steps: int) -> Trace:
        return self.traces[case.name]


def _fp8_layers(manifest: dict, patterns: Sequence[str]) -> tuple[dict[str, float], str]:
    """({layer: calibrated input amax}, weight scheme) of fp8 artifacts."""
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
    # artifacts from before the per-tensor default had per-channel weight scales
    return amax, quantization.get("weight_scheme", "per-channel")


class _FP8Forward:
    """A job override: the loaded Linear computes as the artifacts' FP8Linear would, its
    weight quantized from the checkpoint's float32 values, in a ``dtype`` base. One object
    per layer, shared by every job (LayerMajor keeps what it makes while the layer is
    loaded)."""

    def __init__(self, family: Family, weights, name: str, amax: float, scheme: str, dtype):
        self.family, self.weights, self.name, self.amax = family, weights, name, amax
        self.scheme, self.dtype = scheme, dtype

    def __call__(self, linear):
        import torch
        from torch import nn

        from mllama_export.graphs.quant import FP8Linear

        read_float = self.family.part("layerwise").read_float

        exact = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        exact.weight = nn.Parameter(read_float(self.weights, f"{self.name}.weight", torch.float32))
        if linear.bias is not None:
            exact.bias = nn.Parameter(read_float(self.weights, f"{self.name}.bias", torch.float32))
        return FP8Linear(exact, self.amax, self.dtype, self.scheme).forward


class _Session:
    """The checkpoint run layer by layer twice over: in float32 (the reference, and each
    layer's own FP8 error) and in the artifacts' dtype (layers together, as the artifacts
    compute them, float16 rounding included)."""

    def __init__(self, weights, manifest, cases, steps, thresholds, scheme, prefill_chunk):
        from mllama_export.exporter.family_build import manifest_model_options
        from mllama_export.exporter.options import PRECISION_TORCH_DTYPES

        self.family = family_of_config(manifest["model"]["config"])
        self.layerwise = self.family.part("layerwise")
        LazyModel = self.layerwise.LazyModel  # noqa: N806 (a class)
        options = manifest_model_options(manifest)
        limits = Limits(**manifest["limits"])
        self.weights, self.dtype = weights, PRECISION_TORCH_DTYPES["fp8"]
        self.lazy = {"float32": LazyModel(weights, **options)}
        self.lazy["artifacts"] = LazyModel(weights, dtype=self.dtype, **options)
        self.runners = {base: lazy.runner(limits) for base, lazy in self.lazy.items()}
        self.cases, self.steps, self.thresholds = cases, steps, thresholds
        self.scheme, self.prefill_chunk = scheme, prefill_chunk
        self._forwards: dict[tuple[str, str], _FP8Forward] = {}
        self.reference = _Cached("PyTorch graphs fp32", self._reference_traces())

    def _run(self, base: str, jobs) -> list:
        return self.layerwise.LayerMajor(self.lazy[base]).run(jobs)

    def _reference_traces(self) -> dict[str, Trace]:
        Job = self.layerwise.Job  # noqa: N806 (a class)
        runner = self.runners["float32"]
        jobs = [Job(lambda c=c: trace_runner(runner, c, self.steps)) for c in self.cases]
        return {c.name: t for c, t in zip(self.cases, self._run("float32", jobs), strict=True)}

    def _forward(self, base: str, name: str, amax: float) -> _FP8Forward:
        import torch

        if (base, name) not in self._forwards:
            dtype = torch.float32 if base == "float32" else self.dtype
            self._forwards[base, name] = _FP8Forward(
                self.family, self.weights, name, amax, self.scheme, dtype
            )
        return self._forwards[base, name]

    def gate(self, variants: dict[str, dict[str, float]], base: str, on_pass=None) -> dict:
        """{label: LayerSensitivity of the reference with that variant's layers in FP8, in
        the ``base`` ("float32" or "artifacts")}: every (variant, case) a job,
        VARIANTS_PER_PASS variants per pass over the layers; ``on_pass`` is given the
        results so far after each pass."""
        Job = self.layerwise.Job  # noqa: N806 (a class)
        runner, labels, results = self.runners[base], list(variants), {}
        starts = range(0, len(labels), VARIANTS_PER_PASS)
        passes = bar(starts, len(starts), f"FP8 variants, {VARIANTS_PER_PASS} per pass", "passes")
        for start in passes if len(starts) > 1 else starts:
            group = labels[start : start + VARIANTS_PER_PASS]
            jobs = [
                Job(
                    lambda c=c, label=label: judge(
                        runner,
                        self.reference,
                        [c],
                        self.steps,
                        self.thresholds,
                        "fp8",
                        f"FP8 {label}",
                        False,
                        self.prefill_chunk,
                    ),
                    {n: self._forward(base, n, a) for n, a in variants[label].items()},
                )
                for label in group
                for c in self.cases
            ]
            reports = iter(self._run(base, jobs))
            for label in group:
                results[label] = LayerSensitivity(
                    label, _merged([next(reports) for _ in self.cases])
                )
            if on_pass is not None:
                on_pass(results)
        return results


def _merged(parts: list[DriftReport]) -> DriftReport:
    """The per-case reports of one variant as the one report judge() gives for all cases."""
    first = parts[0]
    merged = DriftReport(
        [r for p in parts for r in p.results],
        first.precision,
        first.thresholds_version,
        first.reference,
        first.backend,
    )
    merged.extra = {**first.extra, "reference_tokens": {}}
    for part in parts:
        merged.extra["reference_tokens"].update(part.extra.get("reference_tokens", {}))
    return merged


def _vision_linears(manifest: dict) -> list[str]:
    """Every layer an --fp8-vision build would quantize, from a model on the meta device."""
    import torch

    from mllama_export.graphs.quant import quantizable_linears

    family = family_of_config(manifest["model"]["config"])
    with torch.device("meta"):
        model = family.part("model")(family.read_config(manifest["model"]["config"]))
    return quantizable_linears(model, vision=True)


def run_sensitivity(
    artifacts: str | Path,
    layers: Sequence[str] = (),
    thresholds: str | Path | None = None,
    cases: Sequence[Any] | None = None,
    steps: int = 8,
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    prefill_chunk: int | None = None,
) -> SensitivityReport:
    """Ranks the FP8 layers of ``artifacts`` (those matching the glob ``layers``; default
    all) by the share of the fp8 budget each uses alone; suggests exclusions when they are
    over SUGGEST_BUDGET together. In PyTorch on the CPU, the checkpoint read layer by layer;
    the artifacts' own graphs are not run (``validate`` judges those).

    With ``out_dir`` the report is rewritten there (atomically) after every pass over the
    layers, marked incomplete until the last run, so that an interrupted run keeps its
    finished rows. ``prefill_chunk``: the quantized side prefills through the step graph in
    chunks."""
    from mllama_export.engines.manifest_read import read_manifest

    start = time.perf_counter()
    manifest = read_manifest(artifacts)
    amax, scheme = _fp8_layers(manifest, layers)
    limits_file = load_thresholds(thresholds)
    source = resolve_checkpoint(manifest, checkpoint)
    if cases is None:
        evalset = source.family.part("evalset")
        cases = evalset.build_evalset(source.config, Limits(**manifest["limits"]), steps)
    extra = {
        "artifacts": str(artifacts),
        "reference_weights": source.describe(),
        "weight_scheme": scheme,
        "cases": [c.name for c in cases],
        "steps": steps,
        "prefill_chunk": prefill_chunk,
        "thresholds_source": limits_file.source,
        "build_options": manifest.get("build_options", {}),
    }
    report = SensitivityReport([], None, limits_file.version, extra, total=len(amax))

    def keep(found: dict[str, LayerSensitivity]) -> None:
        report.layers = sorted(found.values(), key=LayerSensitivity.rank_key)
        if out_dir is not None:
            report.write(out_dir)

    with ExitStack() as stack:
        # the reference weights as a folder to read layer by layer (a preset: synthesized)
        folder = source.as_folder(stack)
        weights = source.family.part("checkpoint")(folder, source.config)
        session = _Session(weights, manifest, cases, steps, limits_file, scheme, prefill_chunk)
        session.gate({name: {name: value} for name, value in amax.items()}, "float32", keep)
        label = f"all {len(amax)} layers"
        with step(f"{label} at once"):
            report.combined = session.gate({label: amax}, "artifacts")[label]
        if report.combined.budget > SUGGEST_BUDGET:
            with step("the fewest exclusions that bring the rest under the budget"):
                report.suggestion = _suggest(session, report.layers, amax, manifest)
    report.extra["seconds"] = round(time.perf_counter() - start, 2)
    if out_dir is not None:
        report.write(out_dir)
    return report


def _suggest(session: _Session, ranked, amax: dict[str, float], manifest: dict) -> Suggestion:
    """The fewest top-ranked layers to exclude: k = 1, 2, 4, ... first, then every k between
    the last too few and the first enough (one pass each)."""
    order = [r.label for r in ranked]

    def variant(k: int) -> dict[str, float]:
        return {n: amax[n] for n in order[k:]}

    def run(ks: list[int]) -> dict[int, LayerSensitivity | None]:
        ks = [k for k in ks if k < len(order)]
        found = session.gate({f"without the top {k}": variant(k) for k in ks}, "artifacts")
        out = {k: found[f"without the top {k}"] for k in ks}
        return out | ({len(order): None} if len(order) not in out else {})

    doubling = sorted({min(2**i, len(order)) for i in range(len(order).bit_length() + 1)})
    tried = run(doubling)
    enough = min(k for k, r in tried.items() if r is None or r.budget <= SUGGEST_BUDGET)
    below = max((k for k in tried if k < enough), default=0)
    tried |= run(list(range(below + 1, enough)))
    k = min(k for k, r in tried.items() if r is None or r.budget <= SUGGEST_BUDGET)
    known = list(manifest.get("quantization", {}).get("layers", {}))
    exclude = order[:k]
    return Suggestion(exclude, exclusion_patterns(exclude, known), tried[k])


def exclusion_patterns(names: Sequence[str], quantized: Sequence[str]) -> list[str]:
    """``names`` as --fp8-exclude glob patterns: a whole layer of a layer stack (the name up
    to its first ``layers.<n>``: Mllama's ``text.layers.3``, ``vision.transformer.layers.0``)
    as ``<layer>.*`` where every FP8 layer under it is excluded, else the names themselves."""
    chosen, patterns, covered = set(names), [], set()
    for name in names:
        match = re.match(r"^(.+?\.layers\.\d+)\.", name)
        if match:
            prefix = match.group(1) + "."
            under = [n for n in quantized if n.startswith(prefix)]
            if under and set(under) <= chosen:
                if prefix not in covered:
                    patterns.append(prefix + "*")
                    covered.add(prefix)
                continue
        patterns.append(name)
    return patterns


def rebuild_command(options: dict, patterns: Sequence[str]) -> str:
    """The `mllama-export build` line that rebuilds the artifacts with ``patterns`` kept in
    16 bits, from the manifest's build options."""
    parts = ["mllama-export build", f"--model {options.get('model', 'MODEL')}"]
    parts.append(f"--out {options.get('out', 'OUT')}-excluded --precision fp8")
    if options.get("fp8_weights"):
        parts.append(f"--fp8-weights {options['fp8_weights']}")
    if options.get("fp8_vision"):
        parts.append("--fp8-vision")
    parts += _kept_options(options)
    for pattern in [*options.get("fp8_exclude", []), *patterns]:
        parts.append(f"--fp8-exclude '{pattern}'")
    return " ".join(parts)


# what else a build records that the rebuild must repeat to build the same artifacts
_KEPT = ("max_batch", "max_seq_len", "max_images", "xattn_mask", "opset", "seed", "calibration")


def _kept_options(options: dict) -> list[str]:
    from mllama_export.exporter.options import BuildOptions

    kept = []
    for name in _KEPT:
        value = options.get(name)
        if value is not None and value != getattr(BuildOptions, name):
            kept.append(f"--{name.replace('_', '-')} {value}")
    return kept


def fp8_advice(report: DriftReport, folder: str | Path, worst: int = 3) -> list[str]:
    """What to do when fp8 artifacts fail the gate: the worst stages, the sensitivity
    command, and the exclusions an earlier sensitivity report in ``folder`` suggested."""
    failed = sorted((r for r in report.results if not r), key=lambda r: -r.worst_check().ratio)
    if report.precision != "fp8" or not failed:
        return []
    stages = ", ".join(
        f"{r.stage} of {r.case!r} ({r.worst_check().metric} at "
        f"{r.worst_check().ratio:.2f}x its limit)"
        for r in failed[:worst]
    )
    lines = [f"FP8 drift over the fp8 limits; worst stages: {stages}"]
    saved = Path(folder) / "sensitivity" / "sensitivity.json"
    suggestion = None
    if saved.is_file():
        data = json.loads(saved.read_text(encoding="utf-8"))
        suggestion = data.get("suggestion") or None
    if suggestion and suggestion.get("patterns"):
        options = data.get("extra", {}).get("build_options", {})
        lines.append(
            f"{saved} suggests keeping {len(suggestion['exclude'])} layer(s) in 16 bits: "
            + rebuild_command(options, suggestion["patterns"])
        )
    else:
        lines.append(
            f"rank the FP8 layers with `mllama-export sensitivity {folder}`; it suggests the "
            "`--fp8-exclude` patterns that bring the build under the fp8 limits"
        )
    return lines


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
    return f"| {rank} | `{s.label}` | {s.budget:.3f} | {s.continuous:.3f} | {values} | {where} |"


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
        f"calibrated input scale, {extra.get('weight_scheme', '?')} FP8 weight scales), "
        "judged by the accuracy gate "
        "against the unquantized reference. budget = the largest share of any fp8 limit the "
        "layer uses (1 = at the limit; rel_l2, cosine and KL on one scale, see "
        "docs/accuracy.md); ties, where the token metrics saturate, are ranked by the share "
        "of the rel_l2, cosine and KL limits alone. The top rows are the candidates for "
        "`build --fp8-exclude`.",
        "",
        "| rank | layer | budget | rel_l2/cos/KL budget | vision rel_l2 | logits rel_l2 "
        "| top1 min | KL max | worst |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
        *([_row("all", rep.combined)] if rep.combined is not None else []),
    ]
    lines += [_row(str(i), s) for i, s in enumerate(rep.layers, start=1)]
    if rep.layers:
        lines += ["", *_suggestion_lines(rep), ""]
    return "\n".join(lines)


def _suggestion_lines(rep: SensitivityReport) -> list[str]:
    top = rep.layers[0].label
    single = (
        f"To keep the most sensitive layer in 16 bits: `mllama-export build ... "
        f"--precision fp8 --fp8-exclude '{top}'` (glob patterns; repeatable)."
    )
    sug = rep.suggestion
    if sug is None:
        return [f"All listed layers together are within {SUGGEST_BUDGET} of the budget.", single]
    left = "none" if sug.remaining is None else f"budget {sug.remaining.budget:.3f}"
    return [
        f"## Suggested exclusions (all together: budget {rep.combined.budget:.3f})",
        "",
        f"Keeping the {len(sug.exclude)} most sensitive layer(s) in 16 bits leaves the rest at "
        f"{left} (target {sug.target}, float32 base):",
        "",
        f"`{rep.rebuild_command()}`",
    ]
