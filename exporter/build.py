"""`mllama-export build`: checkpoint in, checked ONNX graphs and a manifest out, atomically."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from mllama_export.engines.manifest_read import INCOMPLETE_MARKER, read_manifest, verify_files
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.contract import GRAPHS, TensorSpec
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.progress import info, step
from mllama_export.graphs.resolve import ResolvedModel, resolve_model
from mllama_export.graphs.synth import write_checkpoint
from mllama_export.graphs.weights import Checkpoint, load_model

from .checkplan import CheckPlan, plan_check, refuse_fp8_calibration, write_reduced_checkpoint
from .engine_stage import (
    ENGINE_DIR,
    TRTEXEC_SCRIPT,
    build_engines,
    check_engines_before_work,
    check_tensor_volumes,
    limits_problem_hint,
    pending_engines,
    prepare_engines,
    tensorrt_unavailable,
)
from .fp8 import (
    ORT_OPTIMIZATION,
    calibration_cases,
    check_fp8_graph,
    check_fp8_graphs,
    fp8_layers,
    fp8_weight_names,
    input_amax,
    load_fp8_model,
    quantize_fp8,
)
from .manifest import versions, write_manifest
from .options import BuildOptions
from .outdir import (
    INCOMPLETE_TEXT,
    build_lock,
    check_replaceable,
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
    source, plan = _check_before_work(options, out)
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
            _build_into(options, work, source, plan)
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
    config = MllamaConfig.from_hf_dict(manifest["model"]["config"])
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


def _check_before_work(options: BuildOptions, out: Path) -> tuple[ResolvedModel, CheckPlan]:
    """Everything that can be refused is refused before a lock, a folder or a tensor exists."""
    _check_out(out)
    if Path(options.model).exists():  # before a Hub id could be fetched
        _check_apart(out, Path(options.model), options.model)
    check_replaceable(out, options.force)
    source = resolve_model(options.model)
    config = source.config
    options.check(config)
    check_engines_before_work(options, config)
    if options.precision == "fp8":
        fp8_layers(config, options)  # an --fp8-exclude that matches nothing
        if options.calibration is not None and source.path is not None:
            calibration_cases(config, options, source.path)  # a malformed calibration folder
    refuse_fp8_calibration(options, config)
    return source, plan_check(options, config)


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


def _build_into(options: BuildOptions, work: Path, source: ResolvedModel, plan: CheckPlan) -> None:
    checkpoint = _checkpoint_folder(source, options, work)
    config = MllamaConfig.from_hf_config(checkpoint)
    weights = Checkpoint(checkpoint, config)  # strict: every tensor, shape and dtype
    # FP8 calibrates first, layer by layer (the model is never whole in memory)
    quantization = None
    if options.precision == "fp8":
        quantization = quantize_fp8(weights, options, checkpoint)
    amax = input_amax(quantization)
    (work / "onnx").mkdir()
    exporter = StreamingExport(weights, options, amax)
    written = exporter.export_all(work / "onnx")
    graphs = {name: _graph_entry(name, written[name]) for name in GRAPHS}
    if quantization is not None:
        _record_fp8_layout(exporter, work / "onnx", options, graphs)
    checks = _check(plan, options, weights, work, amax)
    for name, check in checks.items():
        check.pop("quantized_layers", None)
        graphs[name]["check"] = check
    for side in SIDE_FILES:
        if (checkpoint / side).is_file():
            shutil.copy(checkpoint / side, work / side)
    if checkpoint.parent == work:
        shutil.rmtree(checkpoint)
    tensorrt = prepare_engines(work, graphs, config, options)
    manifest = _manifest(options, source, config, graphs, quantization, tensorrt)
    write_manifest(work, manifest)


def _record_fp8_layout(exporter: StreamingExport, folder: Path, options, graphs) -> None:
    """The structure of each full-size FP8 graph (exporter/fp8_graph.py), checked on the
    meta model the export traced: which layers each graph quantizes, and its precision."""
    expected = fp8_weight_names(exporter.model, exporter.checkpoint.config, options.dtype)
    for name in GRAPHS:
        path = folder / f"{name}.onnx"
        layout = check_fp8_graph(path, expected[name], scheme=options.fp8_weights)
        graphs[name]["quantized_layers"] = layout["quantized_layers"]
        # Q/DQ inside: a strongly typed engine; without: an ordinary float16 one
        graphs[name]["precision"] = "fp8" if layout["quantized_layers"] else "fp16"


def _check(plan: CheckPlan, options, weights: Checkpoint, work: Path, amax) -> dict[str, dict]:
    """The check against PyTorch that ``plan`` chose: on the whole model or on a reduced copy
    of it, exported into a scratch folder that is removed after. FP8 (``amax``: the
    calibrated input scales) runs the FP8 check, every FP8 GEMM output shared
    (exporter/fp8_check.py), on the model quantized as the artifacts hold it."""
    if plan.depth == "none":
        return {name: dict(BF16_UNCHECKED) for name in GRAPHS}
    info(plan.summary())
    if plan.depth == "full":
        checked, onnx_dir = weights, work / "onnx"
    else:
        scratch = work / ".reduced-check"
        with step("writing the reduced copy of the checkpoint"):
            folder = write_reduced_checkpoint(weights, plan.copy, scratch / "checkpoint")
        checked, onnx_dir = Checkpoint(folder, plan.config), scratch / "onnx"
        amax = plan.copy.kept_amax(amax) if amax else amax
        onnx_dir.mkdir()
        StreamingExport(checked, options, amax).export_all(onnx_dir)
    try:
        if options.precision == "fp8":
            checks = _check_fp8(plan, options, checked, onnx_dir, amax)
        else:
            checks = check_graphs(
                _reference(plan, options, checked), onnx_dir, plan.config, options, plan.cases
            )
    finally:
        if plan.depth != "full":
            shutil.rmtree(work / ".reduced-check", ignore_errors=True)
    for check in checks.values():
        check["depth"] = plan.label()
        check["memory_estimate_bytes"] = plan.estimate.peak
    return checks


def _reference(plan: CheckPlan, options, checked: Checkpoint) -> Reference:
    dtype = options.dtype

    def load():
        what = "the model" if plan.depth == "full" else "the reduced copy"
        with step(f"loading {what} in {str(dtype).removeprefix('torch.')} for the check"):
            return load_model(checked.folder, options.xattn_mask, dtype)

    return Reference(load)


def _check_fp8(plan: CheckPlan, options, checked: Checkpoint, onnx_dir: Path, amax) -> dict:
    what = "the model" if plan.depth == "full" else "the reduced copy"
    with step(f"loading {what} quantized as the artifacts hold it, tensor by tensor"):
        model = load_fp8_model(
            checked, options.xattn_mask, amax, options.dtype, options.fp8_weights
        )
    return check_fp8_graphs(model, onnx_dir, options)


def _checkpoint_folder(source: ResolvedModel, options: BuildOptions, work: Path) -> Path:
    """The checkpoint folder (resolved in _check_before_work), or a preset synthesized now."""
    if source.kind == "preset":
        with step(
            f"writing a synthetic {source.name} checkpoint (random weights, seed {options.seed})"
        ):
            return write_checkpoint(source.config, work / "synthetic-checkpoint", options.seed)
    return source.path


def _spec_json(spec: TensorSpec, dtype: str) -> dict:
    return {
        "name": spec.name,
        "dtype": dtype if spec.dtype == "model" else spec.dtype,
        "dims": list(spec.dims),
        "doc": spec.doc,
    }


def _graph_entry(name: str, export: dict) -> dict:
    # weight_bytes_written: the decode graph points at the text weights prefill wrote
    return {"file": f"onnx/{name}.onnx", "weights": f"onnx/{GRAPHS[name].data_file}", **export}


def _manifest(
    options: BuildOptions,
    source: ResolvedModel,
    config: MllamaConfig,
    graphs: dict,
    quantization: dict | None,
    tensorrt: dict,
) -> dict:
    dtype = str(options.dtype).removeprefix("torch.")  # fp8: float16 outside the FP8 GEMMs
    semantics = options.xattn_mask
    for name, graph in GRAPHS.items():
        graphs[name]["inputs"] = [_spec_json(s, dtype) for s in graph.inputs]
        graphs[name]["outputs"] = [_spec_json(s, dtype) for s in graph.outputs]
    return {
        "model": {
            # source: as given; checkpoint: the absolute folder (None for a preset), so that
            # validate finds the weights from any working directory
            **source.to_json(),
            "config": config.to_hf_dict(),
            "xattn_mask": semantics,
            "vision_tap": "layer output" if semantics == "hf" else "layer input",
        },
        "precision": options.precision,
        "io_dtype": dtype,
        "limits": {
            "max_batch": options.max_batch,
            "max_seq_len": options.max_seq_len,
            "max_images": options.max_images,
        },
        "build_options": options.to_json(),
        "versions": versions(),
        "graphs": graphs,
        **({"quantization": quantization} if quantization is not None else {}),
        # the ONNX Runtime graph optimization level the graphs need (FP8 Q/DQ: basic)
        "onnxruntime": {"graph_optimization": ORT_OPTIMIZATION if quantization else "all"},
        "tensorrt": tensorrt,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
