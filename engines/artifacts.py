"""Loading an artifact folder: manifest and hashes checked before any graph is opened."""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mllama_export.engines.manifest_read import check_external_data, read_manifest, verify_files
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.choices import BACKENDS, DEVICES
from mllama_export.graphs.family import Family, family_of_config
from mllama_export.graphs.spec import TensorSpec

from .backend import Backend
from .onnxrt import OnnxRuntimeBackend
from .text import Tokenizer


@dataclass(frozen=True)
class Artifacts:
    """A checked artifact folder, opened: what `Runner.from_artifacts` builds its runner of."""

    family: Family  # the one the manifest's config.json names
    config: Any  # the family's frozen config
    backends: dict[str, Backend | None]  # graph name -> backend; None: no engine for it
    limits: dict[str, int]  # the manifest's: max_batch, max_seq_len, max_images
    io_dtype: str
    tokenizer: Tokenizer | None  # None: the folder has no tokenizer.json
    image_config: Any  # the family's image preprocessing; None: the folder has none


def load_artifacts(
    folder: str | Path,
    backend: str = "onnxruntime",
    device: str = "cpu",
    io_binding: bool | None = None,
) -> Artifacts:
    """Checks the manifest and every file's sha256, then opens the graphs on `backend`.

    io_binding: keep caches in device buffers bound by pointer; on by default on CUDA,
    where it keeps them on the GPU (bfloat16 artifacts excepted: numpy has no such type)."""
    folder = Path(folder)
    if backend not in BACKENDS:
        raise MllamaExportError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise MllamaExportError(f"unknown device {device!r}; available: {', '.join(DEVICES)}")
    manifest = read_manifest(folder)
    check_writer_version(folder, manifest)
    verify_files(folder, manifest)
    family = family_of_config(manifest["model"]["config"], f"{folder}/manifest.json")
    config = family.read_config(manifest["model"]["config"])
    session = family.part("session")
    specs = graph_specs(family, manifest)
    if backend == "tensorrt":
        opened = _tensorrt_backends(folder, manifest, specs, device, io_binding)
    elif backend == "onnx-reference":
        opened = _reference_backends(folder, manifest, specs, device)
    else:
        derived = session.derived_dims(config) if hasattr(session, "derived_dims") else {}
        opened = _onnxruntime_backends(folder, manifest, specs, derived, device, io_binding)
    backends = dict(zip(specs, opened, strict=True))
    if hasattr(session, "opened"):
        backends = session.opened(manifest, backends)
    limits, io_dtype = dict(manifest["limits"]), manifest["io_dtype"]
    inputs = family.part("inputs").from_folder(folder, config)
    return Artifacts(
        family, config, backends, limits, io_dtype, inputs.tokenizer, inputs.image_config
    )


Specs = dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]


def graph_specs(family: Family, manifest: dict) -> Specs:
    """Each graph's inputs and outputs, in the family's order: its contract's, unless its
    session reads them off the manifest (an older graph's, as that manifest recorded them)."""
    session = family.part("session")
    if hasattr(session, "graph_specs"):
        return session.graph_specs(manifest)
    return {name: (g.inputs, g.outputs) for name, g in family.graphs.items()}


def _tensorrt_backends(
    folder: Path, manifest: dict, specs: Specs, device: str, io_binding: bool | None
) -> list:
    """One per graph, in the specs' order; None where the manifest records no engine for a
    graph (Mllama's prefill of a shared text engine, whose decode engine serves prefill)."""
    if not manifest.get("tensorrt", {}).get("built"):
        reason = manifest.get("tensorrt", {}).get("reason", "no engines in the manifest")
        raise MllamaExportError(f"{folder} has no TensorRT engines: {reason}")
    from .tensorrt import tensorrt_backends

    return tensorrt_backends(
        folder, manifest, specs, device, device_outputs=io_binding is not False
    )


def _reference_backends(folder: Path, manifest: dict, specs: Specs, device: str) -> list:
    if device != "cpu":
        raise MllamaExportError(
            f"the onnx-reference backend runs on the CPU only (asked: {device}); use "
            "--backend onnxruntime or tensorrt for the GPU"
        )
    from .onnxref import OnnxReferenceBackend

    graphs = manifest["graphs"]
    for graph in graphs.values():
        check_external_data(folder, folder / graph["file"])
    return [OnnxReferenceBackend(folder / graphs[name]["file"], *specs[name]) for name in specs]


def _onnxruntime_backends(
    folder: Path, manifest: dict, specs: Specs, derived: dict, device: str, io_binding
) -> list:
    if manifest["io_dtype"] == "bfloat16" and device == "cpu":
        raise MllamaExportError(
            f"{folder} holds bf16 graphs, which ONNX Runtime's CPU provider cannot run (it has "
            "no bfloat16 kernels); use --backend onnx-reference (slow, CPU), or run them on a "
            "GPU (--device cuda or --backend tensorrt)"
        )
    graphs = manifest["graphs"]
    bind = (
        io_binding
        if io_binding is not None
        else device == "cuda" and manifest["io_dtype"] != "bfloat16"
    )
    for graph in graphs.values():
        check_external_data(folder, folder / graph["file"])
        check_onnx_runnable(folder / graph["file"])
    # FP8 Q/DQ graphs need BASIC: higher levels fuse them into int8-only kernels.
    optimization = manifest.get("onnxruntime", {}).get("graph_optimization", "all")
    return [
        OnnxRuntimeBackend(
            folder / graphs[name]["file"],
            *specs[name],
            device,
            optimization=optimization,
            io_binding=bind,
            derived_dims=derived,
        )
        for name in specs
    ]


def _major(version: str) -> int | None:
    match = re.match(r"\s*(\d+)\.", str(version))
    return int(match.group(1)) if match else None


def check_writer_version(folder: Path, manifest: dict) -> None:
    """Artifacts written by another major version of mllama-export are refused: the graphs'
    inputs, outputs or semantics may have changed between them."""
    written = (manifest.get("versions") or {}).get("mllama-export")
    try:
        installed = importlib.metadata.version("mllama-export")
    except importlib.metadata.PackageNotFoundError:
        return
    if written is None or _major(written) is None or _major(installed) is None:
        return
    if _major(written) != _major(installed):
        raise MllamaExportError(
            f"{folder} was built by mllama-export {written}; this is mllama-export {installed}, "
            f"which runs artifacts of major version {_major(installed)} only; rebuild them with "
            f"this version, or install mllama-export {_major(written)}.x to run them"
        )


def check_onnx_runnable(onnx_file: Path) -> None:
    """The ONNX file's IR version and ai.onnx opset must be ones the installed ONNX Runtime
    runs; asked of ONNX Runtime itself with a one-node model of the same versions."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    opset = max(
        (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None
    )
    problem = _ort_refuses(model.ir_version, opset)
    if problem is not None:
        import onnxruntime

        raise MllamaExportError(
            f"{onnx_file.parent.name}/{onnx_file.name} has ONNX IR version {model.ir_version} and opset {opset}, which "
            f"the installed onnxruntime {onnxruntime.__version__} cannot run ({problem}); "
            "upgrade onnxruntime, or rebuild the artifacts with an opset it supports "
            "(mllama-export build --opset 19..21)"
        )


@lru_cache(maxsize=32)
def _ort_refuses(ir_version: int, opset: int | None) -> str | None:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    imports = [helper.make_opsetid("", opset if opset is not None else 13)]
    probe = helper.make_model(graph, opset_imports=imports)
    probe.ir_version = ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own untyped errors
        text = str(err)
        for pattern in (
            r"max supported IR version: \d+",
            r"official support for domain \S+ is till opset \d+",
        ):
            if found := re.search(pattern, text):
                return found.group(0)
        return text.strip().splitlines()[-1][-200:] if text.strip() else type(err).__name__
    return None
