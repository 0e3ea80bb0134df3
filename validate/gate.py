"""The accuracy gate: a backend's drift from the float32 PyTorch reference, stage by stage.

For every case of the evaluation set (the family's "evalset" part) both sides run the same
inputs through the family's stages before prefill (Mllama's vision), prefill and ``steps``
decode steps, and each stage is judged with the thresholds of the artifacts' precision:

* the stages before prefill, as the evalset part's ``traced_stages`` reads them off the
  first outputs of each graph; Mllama's ``vision``: the cross-attention K/V of the real tiles of the real images (padding tiles and
  padding images are computed by both sides but never attended, so they are left out);
* ``prefill``: the logits at every real (non-pad) prompt position;
* ``decode[i]``: the logits of decode step ``i``, under teacher forcing: the reference decodes
  greedily and both sides are fed the reference's token at every step, so that one flipped
  near-tie does not turn every later comparison into a comparison of two different texts.
  Each side's K/V cache is built from its own outputs: drift that accumulates in the cache
  still shows, step by step.

The backend side is the ordinary :class:`~mllama_export.engines.runner.Runner` loaded from the
artifact folder: every feed is built by the runner's own code. Teacher forcing is the
runner's own (``generate_ids(forced=...)``: the reference's token is fed at every step); a
tap around each backend keeps its first outputs (Mllama's vision: the cross-attention K/V).
The references: our graphs in float32 (``graphs``), or the family's "reference" part
(Mllama's: transformers, validate/mllama_reference.py). ``prefill_chunk`` judges the
prompt pushed through the step graph in chunks, as ``run --prefill-chunk`` serves it.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mllama_export.engines.manifest_read import read_manifest
from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.family_build import manifest_model_options
from mllama_export.graphs.choices import REFERENCES
from mllama_export.graphs.family import Family, family_of, family_of_config
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.progress import info, step

from .metrics import compare
from .report import DriftReport, Stage
from .thresholds import Thresholds, load_thresholds
from .trace import Reference, Trace

__all__ = [
    "GraphsReference",
    "Trace",
    "judge",
    "load_cases",
    "resolve_checkpoint",
    "run_gate",
    "trace_runner",
]


# -- running a Runner with taps --------------------------------------------------------------


class _Tap:
    """Wraps one backend and keeps what its first call returned (a stage judged before
    prefill is one graph's first call: Mllama's vision)."""

    def __init__(self, backend):
        self.backend = backend
        self.name = getattr(backend, "name", type(backend).__name__)
        self.inputs, self.outputs = backend.inputs, backend.outputs
        self.first: dict[str, np.ndarray] | None = None

    def __getattr__(self, name: str):  # max_step_tokens, store: the backend's
        backend = self.__dict__.get("backend")
        if backend is None:
            raise AttributeError(name)
        return getattr(backend, name)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.backend.infer(feed)
        if self.first is None:
            self.first = out
        return out


def trace_runner(
    runner: Runner,
    case: Any,
    steps: int,
    forced: np.ndarray | None = None,
    prefill_chunk: int | None = None,
) -> Trace:
    """Runs ``case`` (a case of the family's evaluation set) through ``runner``: greedy, or
    fed ``forced`` tokens ([steps + 1, B]); ``prefill_chunk``: the prompt through the step
    graph that many tokens at a time."""
    run = copy.copy(runner)  # the caller's runner keeps its own backends
    taps = {n: _Tap(b) for n, b in runner.backends.items() if b is not None}
    run.backends = {**runner.backends, **taps}
    try:
        # keep_logits: prefill returns every position's logits, so that all are judged
        gen = run.generate_ids(
            case.prompts, case.images, steps + 1, stop_tokens=set(), keep_logits=True,
            prefill_chunk=prefill_chunk, forced=forced,
        )  # fmt: skip
    except MllamaExportError as err:
        raise MllamaExportError(f"case {case.name!r}: {err}") from err
    first = {n: tap.first for n, tap in taps.items() if tap.first is not None}
    stages = runner.family.part("evalset").traced_stages(case, runner.config, first)
    tokens = np.array(gen.token_ids, np.int64).T if forced is None else forced
    prefill = gen.prefill_logits[gen.prompt_mask != 0]
    return Trace(stages, prefill, list(gen.step_logits), tokens)


# -- references -------------------------------------------------------------------------------


class GraphsReference:
    """Our PyTorch graphs in float32, run by the same Runner code as the backend."""

    def __init__(self, model, limits: Limits, label: str = "PyTorch graphs fp32"):
        self.label, self.model = label, model
        self.runner = Runner.from_model(model, limits)

    def trace(self, case: Any, steps: int) -> Trace:
        return trace_runner(self.runner, case, steps)


# -- where the reference weights come from ---------------------------------------------------
#
# The artifact folder holds no PyTorch weights, and they cannot be read back from the ONNX
# files reliably: the dynamo exporter keeps parameter paths only for tensors it used as they
# are (`text.embed_tokens.weight`, norm weights); every Linear weight is constant-folded into
# its transpose under an anonymous name (`val_46`), tanh gates into `tanh`, and so on. And the
# ONNX weights are what is being judged: an fp16 build's weights are rounded (the reference
# would inherit the rounding), and a weight corrupted in one graph file would be judged
# against itself. So the reference is rebuilt from the original checkpoint, in float32:
# --checkpoint, else the manifest's model.source when it is a folder that still exists, else
# (a synthetic preset) the same random weights re-synthesized from build_options.seed, which
# graphs/synth.py makes deterministic. Each route is checked to give the manifest's config.


@dataclass
class ReferenceWeights:
    """Where the float32 reference weights come from: a checkpoint folder, or a preset
    re-synthesized from its seed."""

    config: Any  # the family's frozen config
    folder: Path | None  # None: a preset, synthesized when needed
    preset: str | None = None
    seed: int = 0

    @property
    def family(self) -> Family:
        return family_of(self.config)

    def describe(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        return f"synthetic {self.preset} preset, seed {self.seed}"

    def load(self, **model_options):
        """The family's model in float32, read strictly by its "load_model" part; a preset's
        made in memory by its "synthetic_model" part, or else written by its "synth" part
        (the same seeded random weights the build synthesized) and read back."""
        import torch

        family = self.family
        if self.folder is None and family.has("synthetic_model"):
            return family.part("synthetic_model")(self.config, self.seed, **model_options)
        with ExitStack() as stack:
            folder = self.as_folder(stack)
            return family.part("load_model")(folder, dtype=torch.float32, **model_options)

    def as_folder(self, stack: ExitStack) -> Path:
        if self.folder is not None:
            return self.folder
        write_checkpoint = self.family.part("synth")
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mllama-gate-")))
        return write_checkpoint(self.config, tmp / self.preset, self.seed)


def resolve_checkpoint(manifest: dict, checkpoint: str | Path | None = None) -> ReferenceWeights:
    """The float32 weights the artifacts were built from (see the comment above)."""
    from mllama_export.graphs.resolve import resolve_model

    family = family_of_config(manifest["model"]["config"])
    built = family.read_config(manifest["model"]["config"])
    model = manifest["model"]
    source, recorded = model.get("source"), model.get("checkpoint")
    if checkpoint is not None:
        found, where = resolve_model(checkpoint, "--checkpoint"), f"--checkpoint {checkpoint}"
    elif isinstance(recorded, str) and Path(recorded).is_dir():
        found, where = resolve_model(recorded), f"the manifest's model.checkpoint {recorded}"
    elif model.get("kind") in ("preset", "hub") and isinstance(source, str):
        found, where = resolve_model(source, "the manifest's model.source"), f"{source}"
    elif (
        "kind" not in model
        and isinstance(source, str)
        and (Path(source).is_dir() or source in family.presets)
    ):
        # a manifest of an earlier version: source only, relative to where build ran
        found, where = resolve_model(source), f"the manifest's model.source {source}"
    else:
        missing = recorded if isinstance(recorded, str) else source
        field = "model.checkpoint" if isinstance(recorded, str) else "model.source"
        raise MllamaExportError(
            f"the reference needs the float32 weights the artifacts were built from, and the "
            f"manifest's {field} {missing!r} is not a folder here (the artifacts hold only the "
            "exported graphs); pass --checkpoint PATH"
        )
    seed = int(manifest.get("build_options", {}).get("seed", 0))
    result = ReferenceWeights(found.config, found.path, found.preset, seed if found.preset else 0)
    if result.config != built:
        raise MllamaExportError(
            f"{where} has a different config from the one the artifacts were built with; "
            "pass --checkpoint with the checkpoint they were built from"
        )
    return result


def make_reference(
    kind: str, manifest: dict, checkpoint: ReferenceWeights, stack: ExitStack
) -> Reference:
    """The graphs reference (our graphs in float32), or the family's "reference" part."""
    limits = Limits(**manifest["limits"])
    if kind == "graphs":
        return GraphsReference(checkpoint.load(**manifest_model_options(manifest)), limits)
    if kind != "transformers":
        raise MllamaExportError(f"unknown reference {kind!r}; available: {', '.join(REFERENCES)}")
    return checkpoint.family.part("reference").from_weights(manifest, checkpoint, stack)


def load_cases(folder: str | Path, artifacts: str | Path) -> list:
    """A user's evaluation set for an artifact folder, read by the family its manifest names
    (its "evalset" part's load_evalset)."""
    family = family_of_config(read_manifest(artifacts)["model"]["config"])
    return family.part("evalset").load_evalset(folder, artifacts)


# -- judging ----------------------------------------------------------------------------------


def judge(
    runner: Runner,
    reference: Reference,
    cases: Sequence[Any],
    steps: int,
    thresholds: Thresholds,
    precision: str,
    backend: str,
    log_cases: bool = True,
    prefill_chunk: int | None = None,
) -> DriftReport:
    """Every stage of every case of ``runner`` against ``reference``, teacher-forced; with
    ``log_cases``, one line per case to the ``mllama_export`` logger naming the metric that
    decides it; ``prefill_chunk``: ``runner`` prefills in chunks of that many tokens (the
    reference does not)."""
    if steps < 0:
        raise MllamaExportError(f"steps {steps}: expected 0 or more decode steps")
    if not cases:
        raise MllamaExportError("no evaluation cases to run")
    thresholds.limits_for(precision, "logits")  # a missing precision fails before any work
    evalset = runner.family.part("evalset")
    for name in sorted({stage for c in cases for stage in evalset.case_stages(c)}):
        thresholds.limits_for(precision, name)
    report = DriftReport([], precision, thresholds.version, reference.label, backend)
    # Top-1 flips between logits that an allowed error can swap are ties, not drift.
    ties = thresholds.ties(precision)
    tokens = {}
    for case in cases:
        start = time.perf_counter()
        ref = reference.trace(case, steps)
        ours = trace_runner(runner, case, steps, forced=ref.tokens, prefill_chunk=prefill_chunk)
        stages = []
        for name in sorted(set(ref.stages) | set(ours.stages)):
            if name not in ref.stages or name not in ours.stages:
                raise MllamaExportError(f"case {case.name!r}: only one side ran the {name} graph")
            stages.append((name, compare(ours.stages[name], ref.stages[name], logits=False)))
        stages.append(("prefill", compare(ours.prefill, ref.prefill, True, **ties)))
        for i, (a, r) in enumerate(zip(ours.steps, ref.steps, strict=True)):
            stages.append((str(Stage("decode", i)), compare(a, r, True, **ties)))
        results = [report.record(stage, case.name, m, thresholds) for stage, m in stages]
        tokens[case.name] = ref.tokens.T.tolist()
        if log_cases:
            info(_case_line(case.name, results, time.perf_counter() - start))
    report.extra.update(
        steps=steps,
        teacher_forcing="both sides are fed the reference's greedy token at every decode step",
        top1_ties=ties,
        reference_tokens=tokens,
        prefill_chunk=prefill_chunk,
    )
    return report


def _case_line(name: str, results, seconds: float) -> str:
    """``case: pass; decided by cosine=0.9941 (limit >= 0.99) at decode[3], 59% of its
    limit; worst rel_l2 3.1e-03 (limit <= 0.05)``: the check nearest its limit (among the
    failing ones, if any), which is what decides the verdict, and the rel_l2 the plot shows."""
    first = next((r.stage for r in results if not r), None)
    pool = [(r, c) for r in results for c in (r.violations if first else r.checks)]
    verdict = "pass" if first is None else f"FAIL from {first}"
    line = f"{name}: {verdict}"
    if pool:
        stage, check = max(pool, key=lambda rc: rc[1].ratio)
        line += f"; decided by {check.describe()} at {stage.stage}, {check.ratio:.0%} of its limit"
        if check.metric == "rel_l2":
            return f"{line}, {seconds:.2f}s"
    rel = max(results, key=lambda r: r.metrics.rel_l2)
    return f"{line}; worst rel_l2 {_fmt(rel.metrics.rel_l2)} (the plot's), {seconds:.2f}s"


def _fmt(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def run_gate(
    artifacts: str | Path,
    backend: str = "onnxruntime",
    reference: str = "graphs",
    thresholds: str | Path | None = None,
    cases: Sequence[Any] | None = None,
    steps: int = 8,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    prefill_chunk: int | None = None,
) -> DriftReport:
    """Judges the artifact folder's graphs on ``backend`` against the float32 reference
    (``prefill_chunk``: the backend prefills in chunks of that many prompt tokens).

    ``cases`` defaults to the family's built-in evaluation set (its "evalset" part's
    ``build_evalset``) for the artifacts' config and limits. The
    artifacts are checked against their manifest's sha256 first: tampered files are refused.
    """
    start = time.perf_counter()
    artifacts = Path(artifacts)
    if reference not in REFERENCES:
        raise MllamaExportError(
            f"unknown reference {reference!r}; available: {', '.join(REFERENCES)}"
        )
    limits = load_thresholds(thresholds)
    manifest = read_manifest(artifacts)
    with step(f"loading {artifacts} ({backend} on {device})"):
        runner = Runner.from_artifacts(artifacts, backend, device)
    precision = manifest["precision"]
    if cases is None:
        cases = runner.family.part("evalset").build_evalset(runner.config, runner.limits, steps)
    source = resolve_checkpoint(manifest, checkpoint)
    with ExitStack() as stack:
        with step(f"loading the {reference} reference from {source.describe()}"):
            ref = make_reference(reference, manifest, source, stack)
        report = judge(
            runner, ref, cases, steps, limits, precision, backend, prefill_chunk=prefill_chunk
        )
    report.extra = {
        "artifacts": str(artifacts),
        "device": device,
        "xattn_mask": manifest["model"].get("xattn_mask"),
        "reference_weights": source.describe(),
        "thresholds_source": limits.source,
        "seconds": round(time.perf_counter() - start, 2),
        **report.extra,
    }
    return report
