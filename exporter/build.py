"""`mllama-export build`: checkpoint in, checked ONNX graphs and a manifest out, atomically."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mllama_export.engines.profiles import Limits
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig, preset
from mllama_export.graphs.contract import TensorSpec
from mllama_export.graphs.synth import write_checkpoint
from mllama_export.graphs.weights import Checkpoint, load_model

from .engines import (
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
from .manifest import INCOMPLETE_MARKER, read_manifest, verify_files, versions, write_manifest
from .options import PRESET_NAMES, BuildOptions
from .streaming import DATA_FILES, GRAPHS, StreamingExport, check_depth, refuse_fp8_calibration
from .verify import BF16_UNCHECKED, verify_graph, verify_reduced

SIDE_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

Progress = Callable[[str], None]


def build(options: BuildOptions, progress: Progress = print) -> Path:
    """Writes the artifact folder; on any failure nothing complete-looking is left behind.

    The ONNX stage assembles the folder under a hidden temporary name holding an incomplete
    marker and renames it into place only when complete; a lock keeps two builds off the
    same folder; a build killed outright leaves only its hidden folder, which the next build
    removes. The engine stage then builds the TensorRT engines into the committed folder
    (exporter/engines.py): a failed engine costs only itself, never the ONNX.
    """
    out = Path(options.out)
    _check_before_work(options, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(out):
        for stale in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = out.parent / f".{out.name}.partial-{os.getpid()}"
        work.mkdir()
        (work / INCOMPLETE_MARKER).write_text("mllama-export build in progress\n")
        try:
            _build_into(options, work, progress)
            (work / INCOMPLETE_MARKER).unlink()
            _replace(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        manifest = read_manifest(out)
        if manifest["tensorrt"].get("status") == "pending":
            build_engines(out, pending_engines(manifest), progress)
    return out


def rebuild_engines(
    folder: Path, names=None, rebuild: bool = False, progress: Progress = print
) -> dict:
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
    check_tensor_volumes(config, limits, rebuild_hint=limits_problem_hint(manifest))
    with build_lock(folder):
        todo = pending_engines(read_manifest(folder), names, rebuild)
        if not todo:
            progress("every engine is built by this TensorRT on this GPU (--rebuild rebuilds)")
            return read_manifest(folder)["tensorrt"]
        return build_engines(folder, todo, progress)


def _check_before_work(options: BuildOptions, out: Path) -> None:
    """Everything that can be refused is refused before a lock, a folder or a tensor exists."""
    if out.exists() and not options.force:
        raise MllamaExportError(f"{out} already exists; pass --force to replace it")
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise MllamaExportError(f"--out {out}: {parent} is a file, not a folder")
    model = Path(options.model)
    if model.is_dir() and out.absolute().resolve().is_relative_to(model.resolve()):
        raise MllamaExportError(
            f"--out {out} is inside --model {model}; a --force rebuild would delete the "
            "checkpoint. Choose an output folder outside it."
        )
    is_preset = options.model in PRESET_NAMES and not model.exists()
    if not is_preset and not model.is_dir():
        raise MllamaExportError(
            f"--model {options.model!r} is neither a checkpoint folder nor a preset "
            f"({', '.join(PRESET_NAMES)})"
        )
    config = preset(options.model) if is_preset else MllamaConfig.from_hf_config(model)
    options.check(config)
    check_engines_before_work(options, config)
    if options.precision == "fp8":
        fp8_layers(config, options)  # an --fp8-exclude that matches nothing
        if options.calibration is not None and not is_preset:
            calibration_cases(config, options, model)  # a malformed calibration folder
    refuse_fp8_calibration(options, config)


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """An exclusive flock beside the output folder; the kernel drops it if the build dies.

    The lock file is removed on the way out. A build that opened it just before that removal
    finds its file unlinked once it holds the lock, and takes a fresh one.
    """
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        lock = lock_path.open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            lock.close()
            raise MllamaExportError(
                f"another build into {out} is running (lock {lock_path}); wait for it to finish"
            ) from err
        if lock_path.exists() and os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
            break
        lock.close()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _replace(work: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build_into(options: BuildOptions, work: Path, progress: Progress) -> None:
    checkpoint = _resolve_checkpoint(options, work, progress)
    config = MllamaConfig.from_hf_config(checkpoint)
    weights = Checkpoint(checkpoint, config)  # strict: every tensor, shape and dtype
    depth = check_depth(options, config)
    # FP8 calibrates first, layer by layer (the model is never whole in memory)
    quantization = None
    if options.precision == "fp8":
        quantization = quantize_fp8(weights, options, checkpoint, progress)
    amax = input_amax(quantization)
    model = _load_for_check(options, weights, depth, amax, progress)
    (work / "onnx").mkdir()
    exporter = StreamingExport(weights, options, amax)
    written = exporter.export_all(work / "onnx", progress)
    graphs = {name: _graph_entry(name, written[name]) for name in GRAPHS}
    if quantization is not None:
        _record_fp8_layout(exporter, work / "onnx", options, graphs)
    if options.precision == "bf16":
        checks = {name: dict(BF16_UNCHECKED) for name in GRAPHS}
    elif model is None:
        scratch = work / ".reduced-check"
        checks = verify_reduced(checkpoint, config, options, scratch, progress, amax)
    else:
        checks = _check_full(model, config, options, work, quantization, progress)
    for name, check in checks.items():
        check.pop("quantized_layers", None)
        graphs[name]["check"] = check
    for side in SIDE_FILES:
        if (checkpoint / side).is_file():
            shutil.copy(checkpoint / side, work / side)
    if checkpoint.parent == work:
        shutil.rmtree(checkpoint)
    tensorrt = prepare_engines(work, graphs, config, options, progress)
    manifest = _manifest(options, config, options.xattn_mask, graphs, quantization, tensorrt)
    write_manifest(work, manifest)


def _load_for_check(options, weights: Checkpoint, depth, amax, progress):
    """The whole model in memory when the check runs on it; None otherwise. bf16 cannot run
    here at all (ONNX Runtime's CPU provider has no bf16 kernels), so it loads nothing. FP8
    loads the quantized model as the artifacts hold it, tensor by tensor."""
    if depth != "full" or options.precision == "bf16":
        return None
    progress(f"loading {weights.folder} ({options.precision}, xattn-mask {options.xattn_mask})")
    if options.precision == "fp8":
        return load_fp8_model(weights, options.xattn_mask, amax, options.dtype, options.fp8_weights)
    return load_model(weights.folder, options.xattn_mask, options.dtype)


def _record_fp8_layout(exporter: StreamingExport, folder: Path, options, graphs) -> None:
    """The structure of each full-size FP8 graph (exporter/fp8_check.py), checked on the
    meta model the export traced: which layers each graph quantizes, and its precision."""
    expected = fp8_weight_names(exporter.model, exporter.checkpoint.config, options.dtype)
    for name in GRAPHS:
        path = folder / f"{name}.onnx"
        layout = check_fp8_graph(path, expected[name], scheme=options.fp8_weights)
        graphs[name]["quantized_layers"] = layout["quantized_layers"]
        # Q/DQ inside: a strongly typed engine; without: an ordinary float16 one
        graphs[name]["precision"] = "fp8" if layout["quantized_layers"] else "fp16"


def _check_full(model, config, options, work, quantization, progress) -> dict:
    if quantization is not None:
        checks = check_fp8_graphs(model, work / "onnx", options, progress)
        return {name: {**check, "depth": "full"} for name, check in checks.items()}
    checks = {}
    for name, graph_cls in GRAPHS.items():
        path = work / "onnx" / f"{name}.onnx"
        progress(f"checking the {name} graph against PyTorch")
        checks[name] = {**verify_graph(graph_cls(model), path, config, options), "depth": "full"}
    return checks


def _resolve_checkpoint(options: BuildOptions, work: Path, progress: Progress) -> Path:
    """The checkpoint folder (checked in _check_before_work), or a preset synthesized now."""
    if options.model in PRESET_NAMES and not Path(options.model).exists():
        progress(
            f"writing a synthetic {options.model} checkpoint (random weights, seed {options.seed})"
        )
        return write_checkpoint(preset(options.model), work / "synthetic-checkpoint", options.seed)
    return Path(options.model)


def _spec_json(spec: TensorSpec, dtype: str) -> dict:
    return {
        "name": spec.name,
        "dtype": dtype if spec.dtype == "model" else spec.dtype,
        "dims": list(spec.dims),
        "doc": spec.doc,
    }


def _graph_entry(name: str, export: dict) -> dict:
    # weight_bytes_written: the decode graph points at the text weights prefill wrote
    return {"file": f"onnx/{name}.onnx", "weights": f"onnx/{DATA_FILES[name]}", **export}


def _manifest(
    options: BuildOptions,
    config: MllamaConfig,
    semantics: str,
    graphs: dict,
    quantization: dict | None,
    tensorrt: dict,
) -> dict:
    dtype = str(options.dtype).removeprefix("torch.")  # fp8: float16 outside the FP8 GEMMs
    for name, graph_cls in GRAPHS.items():
        graphs[name]["inputs"] = [_spec_json(s, dtype) for s in graph_cls.INPUTS]
        graphs[name]["outputs"] = [_spec_json(s, dtype) for s in graph_cls.OUTPUTS]
    return {
        "model": {
            "source": options.model,
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
