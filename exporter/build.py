"""`mllama-export build`: checkpoint in, checked ONNX graphs and a manifest out, atomically."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

from mllama_export.engines.manifest_read import INCOMPLETE_MARKER, read_manifest, verify_files
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.checkpoint import Checkpoint
from mllama_export.graphs.family import read_config
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.progress import info, step
from mllama_export.graphs.resolve import ResolvedModel
from mllama_export.graphs.spec import TensorSpec

from .buildplan import BuildPlan, plan_build
from .engine_stage import (
    ENGINE_DIR,
    TRTEXEC_SCRIPT,
    build_engines,
    check_tensor_volumes,
    limits_problem_hint,
    pending_engines,
    prepare_engines,
    tensorrt_unavailable,
)
from .family_build import hook
from .manifest import versions, write_manifest
from .options import BuildOptions
from .outdir import (
    INCOMPLETE_TEXT,
    build_lock,
    partial_path,
    remove_leftovers,
    replace,
    stale_leftovers,
)
from .streaming import StreamingExport
from .verify import BF16_UNCHECKED, Reference, check_graphs

SIDE_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    # transformers 5.x writes the chat template beside the tokenizer; LLaVA's processor
    # settings are in processor_config.json
    "chat_template.jinja",
    "processor_config.json",
)


def build(options: BuildOptions) -> Path:
    """Writes the artifact folder; on any failure nothing complete-looking is left behind.

    The ONNX stage assembles the folder under a hidden temporary name holding an incomplete
    marker and renames it into place only when complete; a lock keeps two builds off the same
    folder; a build killed outright leaves its hidden folder and lock, which the next build of
    the same --out removes (exporter/outdir.py). The engine stage then builds the TensorRT
    engines into the committed folder (exporter/engine_stage.py): a failed engine costs only
    itself, never the ONNX. Progress goes to the ``mllama_export`` logger.
    """
    out = Path(options.out)
    plan = plan_build(options, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(out):
        for left in remove_leftovers(out):
            info(f"removed {left.describe()}")
        for left in stale_leftovers(out.parent):
            info(f"note: {left.describe()}; the next build of that --out removes it")
        work = partial_path(out)
        work.mkdir()
        (work / INCOMPLETE_MARKER).write_text(INCOMPLETE_TEXT)
        try:
            _build_into(plan, work)
            (work / INCOMPLETE_MARKER).unlink()
            replace(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        manifest = read_manifest(out)
        if manifest["tensorrt"].get("status") == "pending":
            build_engines(out, pending_engines(manifest))
    return out


def rebuild_engines(folder: Path, names=None, rebuild: bool = False) -> dict:
    """`mllama-export engines DIR`: builds the engines of an existing artifact folder (the
    retry after a failed engine, or engines built on another machine than the ONNX), after
    checking its files against the manifest; the ONNX stays as it is."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    # the ONNX stage's files must be what it wrote; the engine stage's own (engines, logs,
    # timing cache: a stage killed midway may have left them newer than the manifest) are
    # rebuilt or replaced
    stage = {k for k in manifest["files"] if k.startswith(f"{ENGINE_DIR}/") and k != TRTEXEC_SCRIPT}
    verify_files(
        folder,
        {**manifest, "files": {k: v for k, v in manifest["files"].items() if k not in stage}},
    )
    if not (manifest.get("tensorrt") or {}).get("profiles"):
        raise MllamaExportError(
            f"{folder}'s manifest has no optimization profiles (written by an older "
            "mllama-export?); rebuild the artifacts with `mllama-export build`"
        )
    config = read_config(manifest["model"]["config"], f"{folder}'s manifest")
    precisions = {g.get("precision", manifest["precision"]) for g in manifest["graphs"].values()}
    reason = tensorrt_unavailable(needs_fp8="fp8" in precisions)
    if reason is not None:
        raise MllamaExportError(f"cannot build TensorRT engines here: {reason}")
    limits = Limits(**manifest["limits"])
    text_engine = manifest["tensorrt"].get("text_engine", "split")
    check_tensor_volumes(
        config, limits, rebuild_hint=limits_problem_hint(manifest), text_engine=text_engine
    )
    with build_lock(folder):
        todo = pending_engines(read_manifest(folder), names, rebuild)
        if not todo:
            info("every engine is built by this TensorRT on this GPU (--rebuild rebuilds)")
            return read_manifest(folder)["tensorrt"]
        return build_engines(folder, todo)


def _build_into(plan: BuildPlan, work: Path) -> None:
    """Executes ``plan`` into the hidden folder ``work``: it decides nothing of its own."""
    options, config, family = plan.options, plan.config, plan.family
    checkpoint = _checkpoint_folder(plan.source, options, work)
    # strict: every tensor, shape and dtype
    weights = family.part("checkpoint")(checkpoint, config)
    # FP8 calibrates first, layer by layer (the model is never whole in memory)
    quantization, amax = None, {}
    if plan.precision == "fp8":
        fp8 = family.part("fp8")
        cases = _calibration(plan, checkpoint)
        quantization = fp8.quantize_fp8(weights, options, plan.fp8_layers, cases)
        amax = fp8.input_amax(quantization)
    (work / "onnx").mkdir()
    written = StreamingExport(weights, options, amax).export_all(work / "onnx")
    graphs = {name: _graph_entry(plan, name, written[name]) for name in family.graphs}
    if quantization is not None:
        _record_fp8_layout(plan, work / "onnx", graphs)
    checks = _check(plan, weights, work, amax)
    for name, check in checks.items():
        check.pop("quantized_layers", None)
        graphs[name]["check"] = check
    for side in SIDE_FILES:
        if (checkpoint / side).is_file():
            shutil.copy(checkpoint / side, work / side)
    if checkpoint.parent == work:
        shutil.rmtree(checkpoint)
    tensorrt = prepare_engines(work, graphs, config, options)
    write_manifest(work, _manifest(plan, graphs, quantization, tensorrt))


def _calibration(plan: BuildPlan, checkpoint: Path) -> tuple:
    """The plan's calibration cases; a user folder for a preset is read only now, with the
    tokenizer of the checkpoint just synthesized."""
    if plan.calibration_cases is not None:
        return plan.calibration_cases
    return tuple(plan.family.part("fp8").calibration_cases(plan.config, plan.options, checkpoint))


def _record_fp8_layout(plan: BuildPlan, folder: Path, graphs) -> None:
    """The structure of each full-size FP8 graph (exporter/fp8_graph.py), checked against the
    layers the plan quantizes in each graph; its precision is the plan's."""
    fp8 = plan.family.part("fp8")
    for name in plan.family.graphs:
        path = folder / f"{name}.onnx"
        expected = plan.fp8_weight_names[name]
        layout = fp8.check_fp8_graph(path, expected, scheme=plan.options.fp8_weights)
        graphs[name]["quantized_layers"] = layout["quantized_layers"]
        graphs[name]["precision"] = plan.graph_precisions[name]


def _check(build: BuildPlan, weights: Checkpoint, work: Path, amax) -> dict[str, dict]:
    """The check against PyTorch that the build plan chose: on the whole model or on a
    reduced copy of it, exported into a scratch folder that is removed after. FP8 (``amax``:
    the calibrated input scales) runs the FP8 check, every FP8 GEMM output shared
    (exporter/fp8_check.py), on the model quantized as the artifacts hold it."""
    plan, options, family = build.check, build.options, build.family
    if plan.depth == "none":
        return {name: dict(BF16_UNCHECKED) for name in family.graphs}
    info(plan.summary())
    if plan.depth == "full":
        checked, onnx_dir = weights, work / "onnx"
    else:
        scratch = work / ".reduced-check"
        with step("writing the reduced copy of the checkpoint"):
            reduced = family.part("check").write_reduced_checkpoint
            folder = reduced(weights, plan.copy, scratch / "checkpoint")
        checked, onnx_dir = family.part("checkpoint")(folder, plan.config), scratch / "onnx"
        amax = plan.copy.kept_amax(amax) if amax else amax
        onnx_dir.mkdir()
        StreamingExport(checked, options, amax).export_all(onnx_dir)
    try:
        if build.precision == "fp8":
            checks = _check_fp8(build, checked, onnx_dir, amax)
        else:
            reference = _reference(build, checked)
            checks = check_graphs(reference, onnx_dir, plan.config, options, plan.cases)
    finally:
        if plan.depth != "full":
            shutil.rmtree(work / ".reduced-check", ignore_errors=True)
    for check in checks.values():
        check["depth"] = plan.label()
        check["memory_estimate_bytes"] = plan.estimate.peak if plan.estimate else None
    return checks


def _reference(build: BuildPlan, checked: Checkpoint) -> Reference:
    plan, dtype, family = build.check, build.options.dtype, build.family
    model_options = hook(family, "model_options")(build.options)

    def load():
        what = "the model" if plan.depth == "full" else "the reduced copy"
        with step(f"loading {what} in {str(dtype).removeprefix('torch.')} for the check"):
            return family.part("load_model")(checked.folder, dtype=dtype, **model_options)

    return Reference(load)


def _check_fp8(build: BuildPlan, checked: Checkpoint, onnx_dir: Path, amax) -> dict:
    options, fp8 = build.options, build.family.part("fp8")
    what = "the model" if build.check.depth == "full" else "the reduced copy"
    with step(f"loading {what} quantized as the artifacts hold it, tensor by tensor"):
        model = fp8.load_quantized(checked, options, amax)
    return fp8.check_fp8_graphs(model, onnx_dir, options)


def _checkpoint_folder(source: ResolvedModel, options: BuildOptions, work: Path) -> Path:
    """The checkpoint folder (resolved by plan_build), or a preset synthesized now."""
    if source.kind == "preset":
        with step(
            f"writing a synthetic {source.name} checkpoint (random weights, seed {options.seed})"
        ):
            write = source.family.part("synth")
            return write(source.config, work / "synthetic-checkpoint", options.seed)
    return source.path


def _spec_json(spec: TensorSpec, dtype: str) -> dict:
    return {
        "name": spec.name,
        "dtype": dtype if spec.dtype == "model" else spec.dtype,
        "dims": list(spec.dims),
        "doc": spec.doc,
    }


def _graph_entry(plan: BuildPlan, name: str, export: dict) -> dict:
    # weight_bytes_written: a graph sharing a data file points at the weights an earlier
    # graph wrote (Mllama's decode: prefill's text weights)
    data_file = plan.family.graphs[name].data_file
    return {"file": f"onnx/{name}.onnx", "weights": f"onnx/{data_file}", **export}


def _ort_optimization(plan: BuildPlan, quantization: dict | None) -> str:
    if not quantization:
        return "all"
    return plan.family.part("fp8").ORT_OPTIMIZATION


def _manifest(plan: BuildPlan, graphs: dict, quantization: dict | None, tensorrt: dict) -> dict:
    options, source, config = plan.options, plan.source, plan.config
    dtype = str(plan.dtype).removeprefix("torch.")  # fp8: float16 outside the FP8 GEMMs
    for name, graph in plan.family.graphs.items():
        graphs[name]["inputs"] = [_spec_json(s, dtype) for s in graph.inputs]
        graphs[name]["outputs"] = [_spec_json(s, dtype) for s in graph.outputs]
    return {
        "model": {
            # source: as given; checkpoint: the absolute folder (None for a preset), so that
            # validate finds the weights from any working directory
            **source.to_json(),
            "config": config.to_hf_dict(),
            # the family's own fields (Mllama: the xattn mask semantics and the vision tap)
            **hook(plan.family, "manifest_model")(options),
        },
        "precision": plan.precision,
        "io_dtype": dtype,
        "limits": asdict(plan.limits),
        "build_options": options.to_json(),
        "versions": versions(),
        "graphs": graphs,
        **({"quantization": quantization} if quantization is not None else {}),
        # the ONNX Runtime graph optimization level the graphs need (FP8 Q/DQ: basic)
        "onnxruntime": {"graph_optimization": _ort_optimization(plan, quantization)},
        "tensorrt": tensorrt,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
