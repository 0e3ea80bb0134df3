"""Loading an artifact folder: manifest and hashes checked before any graph is opened."""

from __future__ import annotations

from pathlib import Path

from mllama_export.errors import MllamaExportError
from mllama_export.exporter.manifest import check_external_data, read_manifest, verify_files
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.model import DecodeGraph, PrefillGraph, VisionGraph

from .onnxrt import OnnxRuntimeBackend
from .pipeline import TextRunner
from .preprocess import ImageProcessorConfig
from .runner import Limits
from .text import Tokenizer

BACKENDS = ("onnxruntime", "tensorrt")


def load_runner(
    folder: str | Path, backend: str = "onnxruntime", device: str = "cpu"
) -> TextRunner:
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    config = MllamaConfig.from_hf_dict(manifest["model"]["config"])
    if backend == "tensorrt":
        reason = manifest.get("tensorrt", {}).get("reason", "no engines in the manifest")
        raise MllamaExportError(f"{folder} has no TensorRT engines: {reason}")
    if backend != "onnxruntime":
        raise MllamaExportError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    graphs = manifest["graphs"]
    for graph in graphs.values():
        check_external_data(folder, folder / graph["file"])
    backends = [
        OnnxRuntimeBackend(folder / graphs[name]["file"], cls.INPUTS, cls.OUTPUTS, device)
        for name, cls in (
            ("vision", VisionGraph),
            ("prefill", PrefillGraph),
            ("decode", DecodeGraph),
        )
    ]
    runner = TextRunner(config, *backends, Limits(**manifest["limits"]), manifest["io_dtype"])
    if (folder / "tokenizer.json").is_file():
        runner.tokenizer = Tokenizer.from_dir(folder)
    if (folder / "preprocessor_config.json").is_file():
        runner.image_config = ImageProcessorConfig.from_file(folder / "preprocessor_config.json")
    runner.manifest = manifest
    return runner
