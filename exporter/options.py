"""Build options: what the user asks for, checked against each other and the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.choices import (
    CHECK_DEPTHS,
    DEFAULT_MAX_SEQ_LEN,
    DEFAULT_TEXT_ENGINE,
    MASK_SEMANTICS,
    PRECISION_DTYPES,
    PRECISIONS,
    TEXT_ENGINES,
    WEIGHT_SCHEMES,
)
from mllama_export.graphs.family import family_of
from mllama_export.graphs.limits import Limits

from .family_build import hook

# precision -> the torch dtype of the graphs' weights and activations (graphs/choices.py)
PRECISION_TORCH_DTYPES = {p: getattr(torch, PRECISION_DTYPES[p]) for p in PRECISIONS}


@dataclass(frozen=True)
class BuildOptions:
    model: str  # a checkpoint folder, a Hub id or a preset name (graphs/resolve.py)
    out: Path
    precision: str = "fp32"
    max_batch: int = 4
    # prompt plus generated tokens; None: the family's default (with_defaults)
    max_seq_len: int | None = None
    max_images: int = 2  # per prompt
    # Mllama's cross-attention mask semantics, None for its default (graphs/choices.py
    # DEFAULT_MASK); the family's "build" part hands it to its model, LLaVA's refuses it
    xattn_mask: str | None = None
    opset: int = 19
    seed: int = 0  # for synthesized presets
    force: bool = False
    fp8_vision: bool = False  # fp8 only: quantize the vision encoder and projector too
    # the check against PyTorch: the whole model, a reduced-depth copy, or whichever fits
    check_depth: str = "auto"
    fp8_exclude: tuple[str, ...] = ()  # fp8 only: glob patterns of layers kept in 16 bits
    calibration: Path | None = None  # fp8 only: a prompts.jsonl folder; None: built-in set
    # fp8 only: one weight scale per tensor (TensorRT fuses it into an FP8 GEMM) or per channel
    fp8_weights: str = "per-tensor"
    # TensorRT engines after the ONNX: where TensorRT and a GPU exist (auto), never (skip),
    # or refuse before any work where they cannot be built (require); exporter/engine_stage.py
    engines: str = "auto"
    # split: a prefill and a decode engine (the text weights twice); shared: one engine of
    # the decode (step) graph for both phases (the text weights once); docs/tensorrt.md
    text_engine: str = DEFAULT_TEXT_ENGINE

    @property
    def dtype(self) -> torch.dtype:
        return PRECISION_TORCH_DTYPES[self.precision]

    @property
    def limits(self) -> Limits:
        # build and plan resolve max_seq_len first (with_defaults); a caller of the exporter's
        # parts that did not gets the generic default, as every family had before LLaVA's
        seq = DEFAULT_MAX_SEQ_LEN if self.max_seq_len is None else self.max_seq_len
        return Limits(self.max_batch, seq, self.max_images)

    def with_defaults(self, config: Any) -> BuildOptions:
        """These options with what was left to the model's family filled in (max_seq_len:
        512, or for LLaVA room for max_images of its largest images and some text)."""
        if self.max_seq_len is not None:
            return self
        return replace(self, max_seq_len=default_max_seq_len(config, self.max_images))

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["fp8_exclude"] = list(self.fp8_exclude)
        d["calibration"] = None if self.calibration is None else str(self.calibration)
        return d

    def check(self, config: Any) -> None:
        """Refuses options that contradict each other or the model, before any work starts."""
        if self.max_seq_len is None:
            return self.with_defaults(config).check(config)
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} (available: {', '.join(PRECISIONS)})")
        for name in ("fp8_vision", "fp8_exclude", "calibration"):
            if getattr(self, name) and self.precision != "fp8":
                flag = name.replace("_", "-")
                problems.append(f"{flag} with precision {self.precision} (it needs fp8)")
        if self.fp8_weights not in WEIGHT_SCHEMES:
            problems.append(
                f"fp8-weights {self.fp8_weights!r} (available: {', '.join(WEIGHT_SCHEMES)})"
            )
        elif self.fp8_weights != "per-tensor" and self.precision != "fp8":
            problems.append(f"fp8-weights with precision {self.precision} (it needs fp8)")
        if self.calibration is not None and not Path(self.calibration).exists():
            problems.append(
                f"calibration {str(self.calibration)!r} does not exist (expected a folder "
                "with prompts.jsonl, the format of `validate --evalset`)"
            )
        if self.check_depth not in CHECK_DEPTHS:
            problems.append(
                f"check-depth {self.check_depth!r} (available: {', '.join(CHECK_DEPTHS)})"
            )
        if self.text_engine not in TEXT_ENGINES:
            problems.append(
                f"text-engine {self.text_engine!r} (available: {', '.join(TEXT_ENGINES)})"
            )
        if self.xattn_mask is not None and self.xattn_mask not in MASK_SEMANTICS:
            problems.append(
                f"xattn-mask {self.xattn_mask!r} (available: {', '.join(MASK_SEMANTICS)})"
            )
        for name in ("max_batch", "max_seq_len", "max_images"):
            if getattr(self, name) < 1:
                problems.append(
                    f"{name.replace('_', '-')} {getattr(self, name)} (must be at least 1)"
                )
        # what this model cannot do (Mllama: positions past its max_position_embeddings)
        problems += hook(family_of(config), "option_problems")(self, config)
        if self.max_seq_len < 2:
            problems.append("max-seq-len below 2 (a prompt token and a new token)")
        if not 19 <= self.opset <= 21:
            problems.append(f"opset {self.opset} (supported: 19 to 21)")
        if problems:
            raise MllamaExportError("invalid build options: " + "; ".join(problems))


def with_default_seq_len(chosen: dict, config: Any) -> dict:
    """`plan`'s chosen limits, max_seq_len filled in as build would (BuildOptions.with_defaults)."""
    if chosen["max_seq_len"] is not None:
        return chosen
    return {**chosen, "max_seq_len": default_max_seq_len(config, chosen["max_images"])}


def default_max_seq_len(config: Any, max_images: int) -> int:
    """The family's --max-seq-len for ``max_images`` images a prompt (its build part's hook)."""
    return hook(family_of(config), "default_max_seq_len")(config, max_images)
