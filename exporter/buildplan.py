"""`build`, first half: every check and every decision, before a lock, a folder or a tensor.

``plan_build`` refuses what can be refused (the output folder, the model, the options against
each other and the model, TensorRT's tensor cap, the FP8 layer patterns and calibration
folder, the memory) and returns one frozen ``BuildPlan``. exporter/build.py then executes it:
nothing after planning resolves the model again, re-reads its config, or recomputes the FP8
layers, the calibration cases, the memory or the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.family import Family
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.resolve import ResolvedModel, resolve_model

from .check import CheckPlan, whole_model_check
from .engine_stage import check_engines_before_work
from .options import BuildOptions
from .outdir import check_replaceable


@dataclass(frozen=True)
class BuildPlan:
    """What a build does, decided up front; the execution reads it and decides nothing."""

    options: BuildOptions  # as the user gave them, checked
    source: ResolvedModel  # the model: preset, folder or Hub snapshot, and its config
    # per graph: the precision of its types ("fp16" for an FP8 build's graph without FP8 layers)
    graph_precisions: dict[str, str]
    check: CheckPlan  # the check against PyTorch: depth, cases, memory estimate
    available_memory: int  # bytes, read once: the check and FP8 calibration plan with it
    # fp8 only: the layers quantized, and per graph {FP8 initializer name: layer name}
    fp8_layers: tuple[str, ...] = ()
    fp8_weight_names: dict[str, dict[str, str]] | None = None
    # fp8 only: the calibration cases; None where they are read from a preset's synthetic
    # checkpoint (a user folder tokenized with the tokenizer that only the build writes)
    calibration_cases: tuple | None = None

    @property
    def config(self) -> Any:
        return self.source.config

    @property
    def family(self) -> Family:
        return self.source.family

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint folder; None for a preset (synthesized by the build)."""
        return self.source.path

    @property
    def limits(self) -> Limits:
        return self.options.limits

    @property
    def precision(self) -> str:
        return self.options.precision

    @property
    def dtype(self) -> torch.dtype:
        return self.options.dtype

    @property
    def text_engine(self) -> str:
        return self.options.text_engine


def plan_build(options: BuildOptions, out: Path) -> BuildPlan:
    """Everything that can be refused is refused here, in the order a user meets it."""
    _check_out(out)
    if Path(options.model).exists():  # before a Hub id could be fetched
        _check_apart(out, Path(options.model), options.model)
    check_replaceable(out, options.force)
    source = resolve_model(options.model)
    config, family = source.config, source.family
    options = options.with_defaults(config)
    options.check(config)
    check_engines_before_work(options, config)
    fp8 = _fp8_plan(family, options, source) if options.precision == "fp8" else {}
    checks = family.part("check") if family.has("check") else None
    if checks is None:
        available, check = 0, whole_model_check(family, options, config)
    else:
        available = checks.available_memory()
        checks.refuse_fp8_calibration(options, config, available)
        check = checks.plan_check(options, config, available)
    graphs = _graph_precisions(family, options, fp8)
    return BuildPlan(options, source, graphs, check, available, **fp8)


def _fp8_plan(family: Family, options: BuildOptions, source: ResolvedModel) -> dict:
    if not family.has("fp8"):
        raise MllamaExportError(
            f"--precision fp8: the {family.title} family has no FP8 build; "
            "use --precision fp32, fp16 or bf16"
        )
    quantize, config = family.part("fp8"), source.config
    layers, names = quantize.fp8_layout(config, options)  # an --fp8-exclude matching nothing
    fp8 = {"fp8_layers": tuple(layers), "fp8_weight_names": names}
    if options.calibration is None or source.path is not None:
        # the built-in set, or the user's folder (a malformed one is refused here)
        cases = quantize.calibration_cases(config, options, source.path)
        fp8["calibration_cases"] = tuple(cases)
    return fp8


def _graph_precisions(family: Family, options: BuildOptions, fp8: dict) -> dict[str, str]:
    if options.precision != "fp8":
        return dict.fromkeys(family.graphs, options.precision)
    # Q/DQ inside: a strongly typed FP8 engine; without: an ordinary float16 one
    names = fp8["fp8_weight_names"]
    return {g: "fp8" if names[g] else "fp16" for g in family.graphs}


def _check_out(out: Path) -> None:
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise MllamaExportError(f"--out {out}: {parent} is a file, not a folder")
    here, target = Path.cwd().resolve(), out.resolve()
    if here == target or here.is_relative_to(target):
        raise MllamaExportError(
            f"--out {out} is {'the current folder' if here == target else 'a folder holding the current folder'} "
            f"({here}); the build replaces --out as a whole. Choose a new folder, e.g. --out out/model"
        )


def _check_apart(out: Path, model: Path, given: str) -> None:
    target, checkpoint = out.resolve(), model.resolve()
    if target.is_relative_to(checkpoint):
        raise MllamaExportError(
            f"--out {out} is inside --model {given}; a --force rebuild would delete the "
            "checkpoint. Choose an output folder outside it."
        )
    if checkpoint.is_relative_to(target):
        raise MllamaExportError(
            f"--out {out} holds --model {given}; replacing it would delete the checkpoint. "
            "Choose an output folder outside it."
        )
