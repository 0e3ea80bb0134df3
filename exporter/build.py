"""`mllama-export build`: checkpoint in, checked ONNX graphs and a manifest out, atomically."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig, preset
from mllama_export.graphs.contract import TensorSpec
from mllama_export.graphs.model import DecodeGraph, MllamaModel, PrefillGraph, VisionGraph
from mllama_export.graphs.synth import write_checkpoint
from mllama_export.graphs.weights import load_model

from .manifest import INCOMPLETE_MARKER, fault_point, versions, write_manifest
from .onnx_export import export_graph
from .options import PRESET_NAMES, BuildOptions
from .verify import verify_graph

GRAPHS = {"vision": VisionGraph, "prefill": PrefillGraph, "decode": DecodeGraph}
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

    The folder is assembled under a hidden temporary name holding an incomplete marker and
    renamed into place only when complete; a lock keeps two builds off the same folder; a
    build killed outright leaves only its hidden folder, which the next build removes.
    """
    out = Path(options.out)
    if out.exists() and not options.force:
        raise MllamaExportError(f"{out} already exists; pass --force to replace it")
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
    return out


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """An exclusive flock beside the output folder; the kernel drops it if the build dies."""
    lock_path = out.parent / f".{out.name}.lock"
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise MllamaExportError(
                f"another build into {out} is running (lock {lock_path}); wait for it to finish"
            ) from err
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace(work: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build_into(options: BuildOptions, work: Path, progress: Progress) -> None:
    checkpoint = _resolve_checkpoint(options, work, progress)
    config = MllamaConfig.from_hf_config(checkpoint)
    options.check(config)
    progress(f"loading {checkpoint} ({options.precision}, xattn-mask {options.xattn_mask})")
    model = load_model(checkpoint, options.xattn_mask, options.dtype)
    (work / "onnx").mkdir()
    graphs, checks = {}, {}
    for name, graph_cls in GRAPHS.items():
        path = work / "onnx" / f"{name}.onnx"
        start = time.perf_counter()
        progress(f"exporting the {name} graph")
        fault_point(f"export:{name}")
        export_graph(graph_cls(model), config, options, path)
        fault_point(f"exported:{name}")
        graphs[name] = _graph_entry(graph_cls, path, work, time.perf_counter() - start)
        progress(f"checking the {name} graph against PyTorch")
        checks[name] = verify_graph(graph_cls(model), path, config, options)
        graphs[name]["check"] = checks[name]
    for side in SIDE_FILES:
        if (checkpoint / side).is_file():
            shutil.copy(checkpoint / side, work / side)
    if checkpoint.parent == work:
        shutil.rmtree(checkpoint)
    write_manifest(work, _manifest(options, config, model, graphs))


def _resolve_checkpoint(options: BuildOptions, work: Path, progress: Progress) -> Path:
    if options.model in PRESET_NAMES and not Path(options.model).exists():
        progress(
            f"writing a synthetic {options.model} checkpoint (random weights, seed {options.seed})"
        )
        return write_checkpoint(preset(options.model), work / "synthetic-checkpoint", options.seed)
    path = Path(options.model)
    if not path.is_dir():
        raise MllamaExportError(
            f"--model {options.model!r} is neither a checkpoint folder nor a preset "
            f"({', '.join(PRESET_NAMES)})"
        )
    return path


def _spec_json(spec: TensorSpec, dtype: str) -> dict:
    return {
        "name": spec.name,
        "dtype": dtype if spec.dtype == "model" else spec.dtype,
        "dims": list(spec.dims),
        "doc": spec.doc,
    }


def _graph_entry(graph_cls, path: Path, work: Path, seconds: float) -> dict:
    return {"file": str(path.relative_to(work)), "export_s": round(seconds, 2)}


def _manifest(
    options: BuildOptions, config: MllamaConfig, model: MllamaModel, graphs: dict
) -> dict:
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[options.precision]
    for name, graph_cls in GRAPHS.items():
        graphs[name]["inputs"] = [_spec_json(s, dtype) for s in graph_cls.INPUTS]
        graphs[name]["outputs"] = [_spec_json(s, dtype) for s in graph_cls.OUTPUTS]
    return {
        "model": {
            "source": options.model,
            "config": config.to_hf_dict(),
            "xattn_mask": model.semantics,
            "vision_tap": "layer output" if model.semantics == "hf" else "layer input",
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
        "tensorrt": _tensorrt_status(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _tensorrt_status() -> dict:
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        return {"built": False, "reason": f"TensorRT is not installed ({err})"}
    if not torch.cuda.is_available():
        return {"built": False, "reason": "no CUDA GPU is visible"}
    return {"built": False, "reason": "engine building is not part of this build yet"}


def summarize_check(check: dict) -> str:
    worst = max(check["outputs"].values(), key=lambda m: m["rel_l2"])
    return f"rel L2 {worst['rel_l2']:.1e}" if check.get("ran") else check["reason"]
