"""LLaVA's "plan" part: `mllama-export plan` for a LLaVA preset, checkpoint or artifact folder,
with build's defaults, and what would fit when the plan does not (exporter/llava_plan.py has
the arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mllama_export.engines.llava_profiles import check_text_engine, max_image_tokens
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.resolve import resolve_model

from .llava_plan import LlavaPlan, format_plan, plan
from .options import BuildOptions, with_default_seq_len
from .planning import GPUS, largest

DEFAULTS = {
    "precision": BuildOptions.precision,
    "max_batch": BuildOptions.max_batch,
    "max_seq_len": BuildOptions.max_seq_len,
    "max_images": BuildOptions.max_images,
}


@dataclass(frozen=True)
class LlavaPlanRequest:
    label: str
    config: LlavaConfig
    precision: str
    max_batch: int
    max_seq_len: int
    max_images: int
    gpu: str
    prompt_len: int | None
    tiles: int | None

    def plan(self) -> LlavaPlan:
        return plan(
            self.config, self.precision, self.max_batch, self.max_seq_len, self.max_images,
            self.gpu, self.prompt_len, self.tiles, self.label,
        )  # fmt: skip


def request(
    model: str, given: dict, gpu: str, prompt_len, tiles, text_engine: str | None = None
) -> LlavaPlanRequest:
    """`model`: a preset, a checkpoint folder (or its config.json), a Hub id, or an artifact
    folder whose manifest supplies the precision and limits; `given`: the options the user
    set. Refuses, in one line, what the planned build would refuse."""
    from mllama_export.engines.manifest_read import MANIFEST, read_manifest

    check_text_engine(text_engine or "split")
    if (Path(model) / MANIFEST).is_file():
        manifest = read_manifest(model)
        config = LlavaConfig.from_hf_dict(manifest["model"]["config"])
        base = {"precision": manifest["precision"], **manifest["limits"]}
    else:
        config, base = resolve_model(model, config_file=True).config, dict(DEFAULTS)
    chosen = {**base, **{k: v for k, v in given.items() if v is not None}}
    chosen = with_default_seq_len(chosen, config)
    req = LlavaPlanRequest(model, config, **chosen, gpu=gpu, prompt_len=prompt_len, tiles=tiles)
    req.plan()  # the refusals first
    return req


def what_fits(req: LlavaPlanRequest) -> list[str]:
    """For a plan over the GPU's memory: the nearest requests that fit, one per way out."""
    options = []
    floor = req.max_images * max_image_tokens(req.config)
    for name, low in (("max_seq_len", floor), ("max_batch", 0), ("max_images", 0)):
        value = getattr(req, name)
        best = largest(lambda n, name=name, low=low: _fits(req, **{name: n + low}), value - low - 1)
        if best:
            options.append(f"--{name.replace('_', '-')} {best + low} (from {value})")
    if req.precision != "fp8" and _fits(req, precision="fp8"):
        options.append(
            f"--precision fp8 ({replace(req, precision='fp8').plan().total / 1e9:.1f} GB)"
        )
    for key, gpu in GPUS.items():
        if gpu.memory_bytes > GPUS[req.gpu].memory_bytes and _fits(req, gpu=key):
            options.append(f"--gpu {key} ({gpu.name}, {gpu.memory_bytes / 1e9:.0f} GB)")
    return options


def _fits(req: LlavaPlanRequest, **change) -> bool:
    try:
        return replace(req, **change).plan().fits
    except MllamaExportError:  # e.g. a max_seq_len below the images' tokens
        return False


def plan_text(req: LlavaPlanRequest) -> tuple[str, bool]:
    """The plan's table, and for one that does not fit what would; (text, fits)."""
    result = req.plan()
    text = format_plan(result)
    if result.fits:
        return text, True
    ways = what_fits(req)
    text += "\nwhat would fit, each alone: " + (
        "; ".join(ways) if ways else "nothing within this project's reach (docs/scaling.md)"
    )
    return text, False
