"""The accuracy gate: a backend's drift from the float32 PyTorch reference, stage by stage.

For every case of the evaluation set both sides run the same inputs through vision, prefill
and ``steps`` decode steps, and each stage is judged with the thresholds of the artifacts'
precision:

* ``vision``: the cross-attention K/V of the real tiles of the real images (padding tiles and
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
tap around its vision backend records the cross-attention K/V. ``prefill_chunk`` judges the
prompt pushed through the step graph in chunks, as ``run --prefill-chunk`` serves it.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from mllama_export.engines.evalset import EvalCase, build_evalset
from mllama_export.engines.inputs import prompt_feed
from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.choices import REFERENCES
from mllama_export.graphs.config import PRESETS, MllamaConfig
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.progress import info, step

from .metrics import compare
from .report import DriftReport, Stage
from .thresholds import Thresholds, load_thresholds

__all__ = [
    "GraphsReference",
    "Trace",
    "TransformersReference",
    "judge",
    "resolve_checkpoint",
    "run_gate",
    "trace_runner",
]


@dataclass
class Trace:
    """What one side computed for one case."""

    cross_kv: np.ndarray | None  # [real tiles, 2 (K, V), L_x, H_kv, patches, Dh]; None: no image
    prefill: np.ndarray  # [real prompt positions, V]
    steps: list[np.ndarray] = field(default_factory=list)  # [B, V] per decode step
    tokens: np.ndarray | None = None  # [steps + 1, B]: tokens[i] is the input of decode step i


class Reference(Protocol):
    label: str

    def trace(self, case: EvalCase, steps: int) -> Trace: ...


# -- running a Runner with taps --------------------------------------------------------------


class _Tap:
    """Wraps one backend and keeps what it returns."""

    def __init__(self, backend):
        self.backend = backend
        self.name = getattr(backend, "name", type(backend).__name__)
        self.inputs, self.outputs = backend.inputs, backend.outputs
        self.results: list[dict[str, np.ndarray]] = []

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.backend.infer(feed)
        self.results.append(out)
        return out


def trace_runner(
    runner: Runner,
    case: EvalCase,
    steps: int,
    forced: np.ndarray | None = None,
    prefill_chunk: int | None = None,
) -> Trace:
    """Runs ``case`` through ``runner``: greedy, or fed ``forced`` tokens ([steps + 1, B]);
    ``prefill_chunk``: the prompt through the step graph that many tokens at a time."""
    run = copy.copy(runner)  # the caller's runner keeps its own backends
    vision = _Tap(runner.vision)
    run.vision = vision
    try:
        # keep_logits: prefill returns every position's logits, so that all are judged
        gen = run.generate_ids(
            case.prompts, case.images, steps + 1, stop_tokens=set(), keep_logits=True,
            prefill_chunk=prefill_chunk, forced=forced,
        )  # fmt: skip
    except MllamaExportError as err:
        raise MllamaExportError(f"case {case.name!r}: {err}") from err
    kv = None
    if vision.results:
        out = vision.results[0]
        kv = _real_tiles(out["cross_key"], out["cross_value"], case, runner.config)
    tokens = np.array(gen.token_ids, np.int64).T if forced is None else forced
    prefill = gen.prefill_logits[gen.prompt_mask != 0]
    return Trace(kv, prefill, list(gen.step_logits), tokens)


def _real_tiles(key: np.ndarray, value: np.ndarray, case: EvalCase, config) -> np.ndarray:
    # key, value: [L_x, B, H_kv, I*T*P, Dh] -> [real tiles, 2, L_x, H_kv, P, Dh]
    layers, b, heads, _, dim = key.shape
    tiles, patches = config.vision.max_num_tiles, config.vision.num_patches
    kv = np.stack([key, value]).reshape(2, layers, b, heads, -1, tiles, patches, dim)
    kv = kv.transpose(2, 4, 5, 0, 1, 3, 6, 7)  # [B, I, T, 2, L_x, H_kv, P, Dh]
    real = np.zeros(kv.shape[:3], bool)
    for row, counts in enumerate(case.images.num_tiles):
        for i, n in enumerate(counts):
            real[row, i, :n] = True
    return kv[real]


# -- references -------------------------------------------------------------------------------


class GraphsReference:
    """Our PyTorch graphs in float32, run by the same Runner code as the backend."""

    def __init__(self, model, limits: Limits, label: str = "PyTorch graphs fp32"):
        self.label, self.model = label, model
        self.runner = Runner.from_model(model, limits)

    def trace(self, case: EvalCase, steps: int) -> Trace:
        return trace_runner(self.runner, case, steps)


class TransformersReference:
    """transformers' MllamaForConditionalGeneration in float32, decoding greedily with its
    own cache. Its vision stage is the cross-attention K/V that transformers itself computed
    and cached in the prefill (its cross-attention layers' cache entries), which have our
    layout [B, H_kv, I*T*P, Dh] per layer: the vision encoder, projector, k/v projections and
    k-norm are all judged against transformers' code, not ours."""

    label = "transformers fp32"

    def __init__(self, model, config: MllamaConfig):
        self.model, self.config = model, config

    def trace(self, case: EvalCase, steps: int) -> Trace:
        import torch

        feed = prompt_feed(self.config, case.prompts, case.images)
        feed = {k: torch.from_numpy(v) for k, v in feed.items()}
        images, kwargs = case.images, {}
        if images is not None:
            kwargs = {
                "pixel_values": torch.from_numpy(images.pixel_values),
                "aspect_ratio_ids": torch.from_numpy(images.aspect_ratio_ids),
                "aspect_ratio_mask": torch.from_numpy(images.aspect_ratio_mask),
                "cross_attention_mask": feed["cross_attention_mask"],
            }
        mask, positions = feed["attention_mask"], feed["position_ids"]
        with torch.inference_mode():
            out = self.model(
                input_ids=feed["input_ids"],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **kwargs,
            )
            cache, logits = out.past_key_values, out.logits
            kv = None
            if images is not None:
                layers = [cache.layers[i] for i in self.config.text.cross_attention_layers]
                key = torch.stack([layer.keys for layer in layers]).numpy()
                value = torch.stack([layer.values for layer in layers]).numpy()
                kv = _real_tiles(key, value, case, self.config)
            prefill = logits.numpy()[mask.numpy() != 0]
            tokens = [logits[:, -1].argmax(-1)]
            step_logits = []
            position = positions[:, -1:]
            xmask = feed["cross_attention_mask"][:, -1:]
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position + 1
                step_kwargs = {"cross_attention_mask": xmask} if images is not None else {}
                out = self.model(
                    input_ids=tokens[-1][:, None],
                    attention_mask=mask,
                    position_ids=position,
                    past_key_values=cache,
                    use_cache=True,
                    **step_kwargs,
                )
                cache = out.past_key_values
                step_logits.append(out.logits[:, -1].numpy())
                tokens.append(out.logits[:, -1].argmax(-1))
        return Trace(kv, prefill, step_logits, torch.stack(tokens).numpy().astype(np.int64))


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

    config: MllamaConfig
    folder: Path | None  # None: a preset, synthesized in memory
    preset: str | None = None
    seed: int = 0

    def describe(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        return f"synthetic {self.preset} preset, seed {self.seed}"

    def load(self, semantics: str):
        """Our MllamaModel in float32."""
        import torch

        from mllama_export.graphs.layers import rope_inv_freq
        from mllama_export.graphs.model import MllamaModel
        from mllama_export.graphs.synth import random_state_dict
        from mllama_export.graphs.weights import load_model

        if self.folder is not None:
            return load_model(self.folder, semantics, torch.float32)
        with torch.device("meta"):
            model = MllamaModel(self.config, semantics)
        state = random_state_dict(self.config, self.seed)
        model.load_state_dict(state, assign=True, strict=True)
        model.text.rotary.inv_freq = rope_inv_freq(self.config.text.rope, self.config.text.head_dim)
        return model.eval()

    def folder_for_transformers(self, stack: ExitStack) -> Path:
        if self.folder is not None:
            return self.folder
        from mllama_export.graphs.synth import write_checkpoint

        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mllama-gate-")))
        return write_checkpoint(self.config, tmp / self.preset, self.seed)


def resolve_checkpoint(manifest: dict, checkpoint: str | Path | None = None) -> ReferenceWeights:
    """The float32 weights the artifacts were built from (see the comment above)."""
    from mllama_export.graphs.resolve import resolve_model

    built = MllamaConfig.from_hf_dict(manifest["model"]["config"])
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
        and (Path(source).is_dir() or source in PRESETS)
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
    limits = Limits(**manifest["limits"])
    semantics = manifest["model"]["xattn_mask"]
    if kind == "graphs":
        return GraphsReference(checkpoint.load(semantics), limits)
    if kind != "transformers":
        raise MllamaExportError(f"unknown reference {kind!r}; available: {', '.join(REFERENCES)}")
    if semantics != "hf":
        raise MllamaExportError(
            f"--reference transformers judges artifacts built with --xattn-mask hf only; these "
            f"were built with --xattn-mask {semantics}, which differs from transformers by "
            "design (text before an image ignores it, and the vision encoder taps layer inputs, "
            "as Meta's reference does), so correct artifacts would fail. Use --reference "
            "graphs, or rebuild with --xattn-mask hf"
        )
    try:
        import torch
        from transformers import MllamaForConditionalGeneration
    except ImportError as err:
        raise MllamaExportError(
            f"--reference transformers needs transformers ({err}); "
            "pip install 'mllama-export[reference]'"
        ) from err
    folder = checkpoint.folder_for_transformers(stack)
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return TransformersReference(model.eval(), checkpoint.config)


# -- judging ----------------------------------------------------------------------------------


def judge(
    runner: Runner,
    reference: Reference,
    cases: Sequence[EvalCase],
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
    if any(c.images is not None for c in cases):
        thresholds.limits_for(precision, "vision")
    report = DriftReport([], precision, thresholds.version, reference.label, backend)
    # Top-1 flips between logits that an allowed error can swap are ties, not drift.
    ties = thresholds.ties(precision)
    tokens = {}
    for case in cases:
        start = time.perf_counter()
        ref = reference.trace(case, steps)
        ours = trace_runner(runner, case, steps, forced=ref.tokens, prefill_chunk=prefill_chunk)
        stages = []
        if (ref.cross_kv is None) != (ours.cross_kv is None):
            raise MllamaExportError(f"case {case.name!r}: only one side ran the vision graph")
        if ref.cross_kv is not None:
            stages.append(("vision", compare(ours.cross_kv, ref.cross_kv, logits=False)))
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
    cases: Sequence[EvalCase] | None = None,
    steps: int = 8,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    prefill_chunk: int | None = None,
) -> DriftReport:
    """Judges the artifact folder's graphs on ``backend`` against the float32 reference
    (``prefill_chunk``: the backend prefills in chunks of that many prompt tokens).

    ``cases`` defaults to :func:`build_evalset` for the artifacts' config and limits. The
    artifacts are checked against their manifest's sha256 first: tampered files are refused.
    """
    from mllama_export.engines.manifest_read import read_manifest

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
        cases = build_evalset(runner.config, runner.limits, steps)
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
        "xattn_mask": manifest["model"]["xattn_mask"],
        "reference_weights": source.describe(),
        "thresholds_source": limits.source,
        "seconds": round(time.perf_counter() - start, 2),
        **report.extra,
    }
    return report
