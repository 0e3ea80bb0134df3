"""One engine from one ONNX graph through Polygraphy, and what TensorRT says about it.

Kept apart from exporter/engine_stage.py (which plans, records and orders the builds) so that the
only code touching TensorRT's builder is this file, imported lazily inside the engine stage.
Calls checked against Polygraphy 0.53.6 (`NetworkFromOnnxPath(path, strongly_typed=)`,
`CreateConfig(profiles=, load_timing_cache=, builder_optimization_level=)`, whose default
profiling verbosity is DETAILED, `EngineBytesFromNetwork(network, config, save_timing_cache)`)
and TensorRT 10.0 through 11.1 (NetworkDefinitionCreationFlag.STRONGLY_TYPED exists in both,
a no-op on 11: pyCore.cpp at 11.1).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mllama_export.errors import MllamaExportError

from .manifest import fault_point

_MAX_ERRORS = 20


class EngineBuildError(Exception):
    """An engine TensorRT (or Polygraphy) could not build, with TensorRT's own messages."""

    def __init__(self, graph: str, errors: list[str], log: str):
        self.graph, self.errors, self.log = graph, errors, log
        self.message = errors[0] if errors else "no message"
        super().__init__(self.message)

    def record(self, plan) -> dict[str, Any]:
        return {
            "status": "failed",
            "precision": plan.precision,
            "onnx": plan.onnx,
            "error": self.message,
            "errors": self.errors,
            "log": self.log,
        }


def build_engine(plan, folder: Path, quantized_layers: int, entry: dict) -> dict[str, Any]:
    """Builds `plan` into folder/plan.engine (written as a .partial file, then renamed) and
    returns its manifest entry; raises EngineBuildError with TensorRT's messages."""
    start = time.perf_counter()
    partial = folder / f"{plan.engine}.partial-{os.getpid()}"
    log = f"{Path(plan.engine).with_suffix('.log')}"
    try:
        io = _build_with_polygraphy(plan, folder, partial, folder / log, entry)
        fault_point(f"engine:{plan.graph}")
        partial.replace(folder / plan.engine)
    except MllamaExportError:
        partial.unlink(missing_ok=True)
        raise
    except Exception as err:  # Polygraphy and TensorRT raise their own error types
        partial.unlink(missing_ok=True)
        raise EngineBuildError(plan.graph, _errors(folder / log, err), log) from err
    result = {
        "status": "built",
        "file": plan.engine,
        "onnx": plan.onnx,
        "precision": plan.precision,
        "strongly_typed": True,
        "num_profiles": len(plan.profiles),
        **io,
        "bytes": (folder / plan.engine).stat().st_size,
        "build_s": round(time.perf_counter() - start, 2),
        "log": log,
    }
    if plan.precision == "fp8":
        result["fp8_layers"] = fp8_layer_check(folder / plan.engine, quantized_layers)
    return result


def _build_with_polygraphy(plan, folder: Path, partial: Path, log: Path, entry: dict) -> dict:
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        Profile,
    )
    from polygraphy.logger import G_LOGGER

    cache = str(folder / entry.get("timing_cache", "engines/timing.cache"))
    # Polygraphy routes TensorRT's log through G_LOGGER; its log file keeps TensorRT's own
    # words for the manifest when a build fails (G_LOGGER.log_file, polygraphy/logger)
    G_LOGGER.log_file = str(log)
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            builder, network, parser = NetworkFromOnnxPath(
                str(folder / plan.onnx), strongly_typed=True
            )()
            io = _network_io(network)
            profiles = []
            for p in plan.profiles:
                profile = Profile()
                for name, (lo, opt, hi) in p.shapes.items():
                    profile.add(name, min=lo, opt=opt, max=hi)
                profiles.append(profile)
            config = CreateConfig(
                profiles=profiles,
                load_timing_cache=cache,
                builder_optimization_level=entry.get("optimization_level"),
            )
            engine = EngineBytesFromNetwork(
                (builder, network, parser), config=config, save_timing_cache=cache
            )()
            partial.write_bytes(engine)
    finally:
        G_LOGGER.log_file = None
    return io


def _errors(log: Path, err: BaseException) -> list[str]:
    """TensorRT's and the ONNX parser's error lines from the build log ("[E] ..."), in order,
    else the exception's own first line."""
    found: list[str] = []
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        text = line.strip()
        if text.startswith("[E]"):
            text = text[3:].strip()
            if text and text not in found:
                found.append(text[:500])
    own = str(err).strip().splitlines()
    if not found:
        found.append(own[0][:500] if own else type(err).__name__)
    return found[:_MAX_ERRORS]


def _network_io(network) -> dict[str, list[dict]]:
    def describe(t) -> dict:
        return {"name": t.name, "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)}

    return {
        "inputs": [describe(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [describe(network.get_output(i)) for i in range(network.num_outputs)],
    }


# -- does FP8 really run in FP8 -------------------------------------------------------------


def fp8_layer_check(engine_file: Path, quantized_layers: int) -> dict[str, Any]:
    """The built engine's layers as TensorRT's engine inspector reports them
    (ICudaEngine.create_engine_inspector, get_engine_information(LayerInformationFormat.JSON),
    detailed with Polygraphy's default ProfilingVerbosity.DETAILED), summarized: how many
    GEMM layers there are and how many take FP8 inputs."""
    import tensorrt as trt

    from mllama_export.engines.tensorrt import deserialize_engine

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = deserialize_engine(trt, runtime, engine_file)
    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    return summarize_layers(info, quantized_layers)


GEMM_TYPES = ("gemm", "matrixmultiply", "matmul", "fullyconnected", "convolution")


def summarize_layers(info: str, quantized_layers: int) -> dict[str, Any]:
    """{gemm_layers, fp8_gemm_layers, quantized_layers, non_fp8_gemms (first names), ok}.

    A layer is a GEMM when its LayerType names one (Myelin reports "gemm", classic layers
    "MatrixMultiply"/"CaskGemm..."); it runs in FP8 when an input's Format/Datatype says FP8
    or its kernel (TacticName) is an e4m3 one."""
    layers = _layers(info)
    gemms = [layer for layer in layers if _is_gemm(layer)]
    fp8 = [layer for layer in gemms if _is_fp8(layer)]
    others = [str(layer.get("Name", "?"))[:120] for layer in gemms if not _is_fp8(layer)]
    return {
        "gemm_layers": len(gemms),
        "fp8_gemm_layers": len(fp8),
        "quantized_layers": quantized_layers,
        "non_fp8_gemms": others[:8],
        "ok": len(fp8) > 0 or quantized_layers == 0,
    }


def _layers(info: str) -> list[dict]:
    try:
        data = json.loads(info)
    except ValueError as err:
        raise MllamaExportError(f"TensorRT's engine inspector gave no JSON ({err})") from err
    layers: Iterable = data.get("Layers", []) if isinstance(data, dict) else data
    # without DETAILED verbosity each layer is only its name, as a string
    return [json.loads(x) if isinstance(x, str) and x.startswith("{") else x for x in layers]


def _is_gemm(layer) -> bool:
    kind = str(layer.get("LayerType", "")).lower() if isinstance(layer, dict) else ""
    return any(t in kind for t in GEMM_TYPES)


def _is_fp8(layer: dict) -> bool:
    formats = " ".join(str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", []))
    tactic = str(layer.get("TacticName", "")).lower()
    return "FP8" in formats.upper() or "E4M3" in formats.upper() or "e4m3" in tactic
