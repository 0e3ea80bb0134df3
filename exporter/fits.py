"""`mllama-export plan` as a user asks it: the same model names, defaults and precisions as
`build`, an artifact folder's own manifest, and what would fit when the plan does not.

The arithmetic is exporter/plan.py's; this module only chooses its inputs and, for a plan over
the GPU's memory, searches the nearest ones that fit: fewer tokens, a smaller batch, fewer
images, FP8, the larger GPU, or tensor parallelism over several (docs/scaling.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.resolve import resolve_model

from .options import BuildOptions
from .plan import GB, GPUS, Plan, format_plan, plan

# build's defaults, so that `plan` answers for what `build` would build
DEFAULTS = {
    "precision": BuildOptions.precision,
    "max_batch": BuildOptions.max_batch,
    "max_seq_len": BuildOptions.max_seq_len,
    "max_images": BuildOptions.max_images,
}
TP_DEGREES = (2, 4, 8)


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

    def plan(self, **change) -> Plan:
        args = {**vars(self), **change}
        return plan(
            args["config"], args["precision"], args["max_batch"], args["max_seq_len"],
            args["max_images"], args["gpu"], args["prompt_len"], args["tiles"],
        )  # fmt: skip


def request(model: str, given: dict, gpu: str, prompt_len, tiles) -> PlanRequest:
    """``model``: a preset, a checkpoint folder (or its config.json), a Hub id, or an artifact
    folder, whose manifest supplies the precision and limits it was built with; ``given``
    holds the options the user set (anything else takes the artifacts' or build's value)."""
    from .manifest import MANIFEST, read_manifest

    if (Path(model) / MANIFEST).is_file():
        manifest = read_manifest(model)
        config = MllamaConfig.from_hf_dict(manifest["model"]["config"])
        base = {"precision": manifest["precision"], **manifest["limits"]}
        label = f"{model} (artifacts of {manifest['model'].get('source')})"
        origin = "the artifacts'"
    else:
        resolved = resolve_model(model, config_file=True)
        config, base, label = resolved.config, dict(DEFAULTS), model
        origin = "build's default"
    chosen = {**base, **{k: v for k, v in given.items() if v is not None}}
    if (
        prompt_len is not None
        and given.get("max_seq_len") is None
        and prompt_len > chosen["max_seq_len"]
    ):
        raise MllamaExportError(
            f"--prompt-len {prompt_len} exceeds --max-seq-len {chosen['max_seq_len']} ({origin}); "
            f"expected 1..{chosen['max_seq_len']}, or pass a larger --max-seq-len"
        )
    return PlanRequest(label, config, **chosen, gpu=gpu, prompt_len=prompt_len, tiles=tiles)


def what_fits(req: PlanRequest) -> list[str]:
    """For a plan over the GPU's memory: the nearest requests that fit, one per way out."""
    options = []
    seq = _largest(
        lambda n: req.plan(max_seq_len=n, prompt_len=_cap(req.prompt_len, n)), req.max_seq_len
    )
    if seq:
        options.append(f"--max-seq-len {seq} (from {req.max_seq_len})")
    batch = _largest(lambda n: req.plan(max_batch=n), req.max_batch)
    if batch:
        options.append(f"--max-batch {batch} (from {req.max_batch})")
    images = _largest(lambda n: req.plan(max_images=n), req.max_images)
    if images:
        options.append(f"--max-images {images} (from {req.max_images})")
    if req.precision != "fp8" and req.plan(precision="fp8").fits:
        options.append(f"--precision fp8 ({_gb(req.plan(precision='fp8').total_bytes)})")
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


def _largest(plan_at, current: int) -> int | None:
    """The largest n below ``current`` at which ``plan_at(n)`` fits (None: not even 1)."""
    low, high = 0, current - 1  # fits at low (0 = none found), not known above
    while low < high:
        mid = (low + high + 1) // 2
        try:
            fits = plan_at(mid).fits
        except MllamaExportError:
            fits = False
        low, high = (mid, high) if fits else (low, mid - 1)
    return low or None


def _cap(prompt_len: int | None, n: int) -> int | None:
    return None if prompt_len is None else min(prompt_len, n)


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def plan_text(req: PlanRequest) -> tuple[str, bool]:
    """The table, and for a plan that does not fit what would; (text, fits)."""
    result = req.plan()
    text = f"model {req.label}\n" + format_plan(result)
    if result.fits:
        return text, True
    ways = what_fits(req)
    if ways:
        text += "\nwhat would fit, each alone: " + "; ".join(ways)
    else:
        text += "\nnothing within this project's reach fits: see docs/scaling.md"
    return text, False
