"""`mllama-export plan` as a user asks it: the same model names, defaults and precisions as
`build`, an artifact folder's own manifest, and what would fit when the plan does not.

The arithmetic is exporter/plan.py's; this module only chooses its inputs and, for a plan over
the GPU's memory, searches the nearest ones that fit: fewer tokens, a smaller batch, fewer
images, FP8, one text engine instead of two, the larger GPU, or tensor parallelism over
several (docs/scaling.md); and it shows both text engines side by side with the largest batch
and sequence each fits, in memory and under TensorRT's per-tensor cap (engines/profiles.py),
which `build` applies before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mllama_export.engines.profiles import largest_fitting
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.choices import DEFAULT_TEXT_ENGINE, TEXT_ENGINES
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.resolve import resolve_model

from .options import BuildOptions, with_default_seq_len
from .plan import GB, GPUS, Plan, format_plan, plan
from .planning import largest

# build's defaults, so that `plan` answers for what `build` would build
DEFAULTS = {
    "precision": BuildOptions.precision,
    "max_batch": BuildOptions.max_batch,
    "max_seq_len": BuildOptions.max_seq_len,
    "max_images": BuildOptions.max_images,
}
TP_DEGREES = (2, 4, 8)
_MOST_BATCH = 1 << 16


@dataclass(frozen=True)
class PlanRequest:
    label: str  # what the model is, in words
    config: MllamaConfig
    precision: str
    max_batch: int
    max_seq_len: int
    max_images: int
    gpu: str
    prompt_len: int | None
    tiles: int | None
    text_engine: str = DEFAULT_TEXT_ENGINE

    def plan(self, **change) -> Plan:
        args = {**vars(self), **change}
        return plan(
            args["config"], args["precision"], args["max_batch"], args["max_seq_len"],
            args["max_images"], args["gpu"], args["prompt_len"], args["tiles"],
            args["text_engine"],
        )  # fmt: skip


def request(
    model: str, given: dict, gpu: str, prompt_len, tiles, text_engine: str | None = None
) -> PlanRequest:
    """``model``: a preset, a checkpoint folder (or its config.json), a Hub id, or an artifact
    folder, whose manifest supplies the precision and limits it was built with; ``given``
    holds the options the user set (anything else takes the artifacts' or build's value)."""
    from mllama_export.engines.manifest_read import MANIFEST, read_manifest

    if (Path(model) / MANIFEST).is_file():
        manifest = read_manifest(model)
        config = MllamaConfig.from_hf_dict(manifest["model"]["config"])
        base = {"precision": manifest["precision"], **manifest["limits"]}
        built = manifest.get("build_options", {}).get("text_engine", DEFAULT_TEXT_ENGINE)
        text_engine = text_engine or built
        label = f"{model} (artifacts of {manifest['model'].get('source')})"
        origin = "the artifacts'"
    else:
        resolved = resolve_model(model, config_file=True)
        config, base, label = resolved.config, dict(DEFAULTS), model
        origin = "build's default"
    chosen = {**base, **{k: v for k, v in given.items() if v is not None}}
    chosen = with_default_seq_len(chosen, config)
    if (
        prompt_len is not None
        and given.get("max_seq_len") is None
        and prompt_len > chosen["max_seq_len"]
    ):
        raise MllamaExportError(
            f"--prompt-len {prompt_len} exceeds --max-seq-len {chosen['max_seq_len']} ({origin}); "
            f"expected 1..{chosen['max_seq_len']}, or pass a larger --max-seq-len"
        )
    return PlanRequest(
        label, config, **chosen, gpu=gpu, prompt_len=prompt_len, tiles=tiles,
        text_engine=text_engine or DEFAULT_TEXT_ENGINE,
    )  # fmt: skip


def what_fits(req: PlanRequest) -> list[str]:
    """For a plan over the GPU's memory: the nearest requests that fit, one per way out."""
    options = []
    seq = largest(
        lambda n: _fits(req, max_seq_len=n, prompt_len=_cap(req.prompt_len, n)),
        req.max_seq_len - 1,
    )
    if seq:
        options.append(f"--max-seq-len {seq} (from {req.max_seq_len})")
    batch = largest(lambda n: _fits(req, max_batch=n), req.max_batch - 1)
    if batch:
        options.append(f"--max-batch {batch} (from {req.max_batch})")
    images = largest(lambda n: _fits(req, max_images=n), req.max_images - 1)
    if images:
        options.append(f"--max-images {images} (from {req.max_images})")
    others = [("precision", "fp8")] if req.precision != "fp8" else []
    others += [("text_engine", e) for e in TEXT_ENGINES if e != req.text_engine]
    for option, value in others:
        other = req.plan(**{option: value})
        if other.fits:
            options.append(f"--{option.replace('_', '-')} {value} ({_gb(other.total_bytes)})")
    for name, gpu in GPUS.items():
        if gpu.memory_bytes > GPUS[req.gpu].memory_bytes and req.plan(gpu=name).fits:
            options.append(f"--gpu {name} ({gpu.name}, {gpu.memory_bytes / GB:.0f} GB)")
    options += _tensor_parallel(req)
    return options


def _tensor_parallel(req: PlanRequest) -> list[str]:
    total, t = req.plan().total_bytes, req.config.text
    memory = GPUS[req.gpu].memory_bytes
    for degree in TP_DEGREES:
        if t.num_heads % degree or t.num_kv_heads % degree:
            continue
        if total / degree <= memory:
            return [
                f"{degree} x {GPUS[req.gpu].name} with tensor parallelism (about "
                f"{_gb(total / degree)} each; not built by this project: docs/scaling.md)"
            ]
    return []


def _fits(req: PlanRequest, **change) -> bool:
    try:
        return req.plan(**change).fits
    except MllamaExportError:  # e.g. a prompt longer than the limit tried
        return False


def _cap(prompt_len: int | None, n: int) -> int | None:
    return None if prompt_len is None else min(prompt_len, n)


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def plan_text(req: PlanRequest) -> tuple[str, bool]:
    """The table, both text engines side by side, and for a plan that does not fit what
    would; (text, fits)."""
    result = req.plan()
    text = f"model {req.label}\n" + format_plan(result) + "\n" + compare_text_engines(req)
    if result.fits:
        return text, True
    ways = what_fits(req)
    if ways:
        text += "\nwhat would fit, each alone: " + "; ".join(ways)
    else:
        text += "\nnothing within this project's reach fits: see docs/scaling.md"
    return text, False


@dataclass(frozen=True)
class Fitting:
    text_engine: str
    total_bytes: int
    fits: bool
    batch: int  # the largest max_batch at this max_seq_len that fits in memory (0: none)
    seq_len: int  # the largest max_seq_len at this max_batch that fits in memory (0: none)
    batch_cap: int  # ... that also keeps every engine tensor under TensorRT's cap
    seq_len_cap: int


def fitting(
    config: MllamaConfig,
    precision: str,
    max_batch: int,
    max_seq_len: int,
    max_images: int,
    gpu: str,
    text_engine: str,
    tiles: int | None = None,
) -> Fitting:
    """The plan at these limits, and the largest batch and max_seq_len (each with the other
    limits kept) that fit the GPU's memory, then also TensorRT's per-tensor cap."""

    def fits(b: int, s: int) -> bool:
        return plan(config, precision, b, s, max_images, gpu, None, tiles, text_engine).fits

    here = plan(
        config, precision, max_batch, max_seq_len, max_images, gpu, None, tiles, text_engine
    )
    batch = largest(lambda b: fits(b, max_seq_len), _MOST_BATCH)
    seq = largest(lambda s: fits(max_batch, s), config.text.max_position_embeddings)

    def capped(limit: str, value: int) -> int:
        if value == 0:
            return 0
        limits = replace(Limits(max_batch, max_seq_len, max_images), **{limit: value})
        return largest_fitting(config, limits, limit, text_engine=text_engine) or 0

    return Fitting(
        text_engine, here.total_bytes, here.fits, batch, seq,
        capped("max_batch", batch), capped("max_seq_len", seq),
    )  # fmt: skip


def compare_text_engines(req: PlanRequest) -> str:
    """Both text engines side by side: total, fits or not, the limits each fits."""
    lines = ["", "text engines (build --text-engine):"]
    for engine in TEXT_ENGINES:
        f = fitting(
            req.config, req.precision, req.max_batch, req.max_seq_len, req.max_images, req.gpu,
            engine, req.tiles,
        )  # fmt: skip
        lines.append(
            f"  {engine:<7}{f.total_bytes / GB:8.2f} GB, {'fits' if f.fits else 'does NOT fit'}; "
            f"largest batch at seq {req.max_seq_len}: {f.batch} (TensorRT's tensor cap: "
            f"{f.batch_cap}); longest seq at batch {req.max_batch}: {f.seq_len} (cap: "
            f"{f.seq_len_cap})"
        )
    return "\n".join(lines)
