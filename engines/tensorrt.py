"""TensorRT backend: one engine per graph, several optimization profiles, I/O on the GPU.

Contract (the same `infer(feed) -> outputs` as every backend, engines/backend.py):

- `feed` maps every input name of the graph to a numpy array or a torch tensor (CUDA or CPU)
  of the engine's dtype. Host arrays are copied to the device; CUDA tensors are bound by
  pointer, never copied (a misaligned or non-contiguous view is made contiguous first).
- The optimization profile is chosen per call with `profiles.select_profile` (the smallest
  profile containing the call's shapes; a call outside every profile raises
  MllamaExportError naming the shapes and the ranges), switched only when it changes.
- Everything (host-to-device copies, output allocation, the engine, device-to-host copies)
  runs on one CUDA stream: the stream given at construction, else the caller's current
  stream at each call. Outputs are fresh tensors from torch's caching allocator, so they
  may be kept across calls.
- Outputs are torch CUDA tensors when `device_outputs` is True, or when it is None (the
  default) and any input was a torch tensor; numpy arrays otherwise (after the stream
  finishes). With `device_outputs=True` the backend also has a `store` (engines/store.py),
  through which the runner keeps its caches on the GPU: the decode loop then passes device
  caches in and gets device K/V out, and only the logits of the last position cross to the
  host each step.

Engines are deserialized from files whose sha256 the caller has already checked against the
manifest (artifacts.load_runner does, before any backend is made). TensorRT is imported
lazily; without it, constructing a backend raises MllamaExportError in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.contract import TensorSpec

from .backend import check_feed
from .profiles import ShapeProfile, select_profile

# TensorRT DataType names -> torch dtype names
_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
}
_ALIGNMENT = 256  # TensorRT requires device I/O addresses aligned to 256 bytes
_MAX_REMEMBERED_SHAPES = 4096


def import_tensorrt():
    try:
        import tensorrt
    except Exception as err:  # ImportError, or OSError for a missing libnvinfer
        raise MllamaExportError(
            f"the TensorRT backend needs TensorRT and a CUDA GPU; TensorRT is not importable "
            f"here ({type(err).__name__}: {err})"
        ) from err
    return tensorrt


class TensorRTBackend:
    name = "tensorrt"

    def __init__(
        self,
        engine_path: str | Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        profiles: Sequence[ShapeProfile],
        device: str = "cuda",
        device_outputs: bool | None = None,
        stream: Any = None,
    ):
        trt = import_tensorrt()
        import torch

        self._trt, self._torch = trt, torch
        self.inputs, self.outputs = inputs, outputs
        self.label = Path(engine_path).stem
        self.profiles = list(profiles)
        self.device = self._resolve_device(device)
        self.device_outputs, self._stream = device_outputs, stream
        self.store = None
        if device_outputs:
            from .store import TorchStore

            self.store = TorchStore(str(self.device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            data = Path(engine_path).read_bytes()
        except OSError as err:
            raise MllamaExportError(f"cannot read the engine {engine_path}: {err}") from err
        with self._device_scope():
            self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise MllamaExportError(
                f"TensorRT {trt.__version__} cannot deserialize {engine_path}: built by another "
                "TensorRT version or for another GPU? Rebuild it (engines/trtexec.sh)"
            )
        self._check_engine(engine_path)
        with self._device_scope():
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise MllamaExportError(
                f"TensorRT cannot create an execution context for {engine_path} "
                "(out of device memory?)"
            )
        names = [s.name for s in (*inputs, *outputs)]
        self._dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        host = getattr(trt, "TensorLocation", None)
        self._on_host = {
            s.name
            for s in inputs
            if host is not None and self.engine.get_tensor_location(s.name) == host.HOST
        }
        self._active: int | None = None
        self._chosen: dict[tuple, int] = {}

    # -- hooks a test can replace to run the same code on the CPU with a stand-in engine --

    def _resolve_device(self, device: str):
        torch = self._torch
        dev = torch.device("cuda" if device == "cpu" else device)
        if dev.type != "cuda":
            raise MllamaExportError(f"TensorRT runs on a CUDA device; got device {device!r}")
        if not torch.cuda.is_available():
            raise MllamaExportError("the TensorRT backend needs a CUDA GPU; none is visible")
        return dev

    def _device_scope(self) -> AbstractContextManager:
        return self._torch.cuda.device(self.device)

    def _streams(self) -> tuple[Any, Any]:
        """(the caller's current stream, the stream this call runs on)."""
        caller = self._torch.cuda.current_stream(self.device)
        return caller, self._stream or caller

    def _handle(self, stream) -> int:
        return stream.cuda_stream

    # -- the contract --

    def infer(self, feed: dict[str, Any]) -> dict[str, Any]:
        check_feed(self.label, self.inputs, feed)
        torch = self._torch
        shapes = tuple(tuple(int(d) for d in feed[s.name].shape) for s in self.inputs)
        index = self._chosen.get(shapes)
        if index is None:
            index = select_profile(
                self.profiles, {s.name: shape for s, shape in zip(self.inputs, shapes, strict=True)}
            )
            if len(self._chosen) >= _MAX_REMEMBERED_SHAPES:
                self._chosen.clear()
            self._chosen[shapes] = index
        as_torch = self.device_outputs
        if as_torch is None:
            as_torch = any(isinstance(v, torch.Tensor) for v in feed.values())
        with self._device_scope():
            caller, stream = self._streams()
            if stream is not caller:  # a dedicated stream: start after the caller's work
                stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                results = self._run(feed, index, stream, caller)
            if as_torch:
                if stream is not caller:  # the caller's stream reads them next
                    caller.wait_stream(stream)
                    for tensor in results.values():
                        tensor.record_stream(caller)
                return results
            with torch.cuda.stream(stream):
                return {name: _host(torch, t) for name, t in results.items()}

    def _run(self, feed: dict, index: int, stream, caller) -> dict:
        torch, handle = self._torch, self._handle(stream)
        bound = {s.name: self._put(s.name, feed[s.name]) for s in self.inputs}
        if stream is not caller:
            for s in self.inputs:  # the caller's own tensors, read on our stream
                if isinstance(feed[s.name], torch.Tensor) and bound[s.name].is_cuda:
                    bound[s.name].record_stream(stream)
        ctx = self.context
        if index != self._active:
            if not ctx.set_optimization_profile_async(index, handle):
                raise MllamaExportError(
                    f"TensorRT refused optimization profile {index} of the {self.label} engine"
                )
            self._active = index
        for name, tensor in bound.items():
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise MllamaExportError(
                    f"{self.label} engine: TensorRT refused the shape {list(tensor.shape)} "
                    f"of {name} in profile {index} ({self.profiles[index].describe()})"
                )
            ctx.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for spec in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise MllamaExportError(
                    f"{self.label} engine: output {spec.name} has an unresolved shape {shape}"
                )
            out = torch.empty(shape, dtype=self._dtypes[spec.name], device=self.device)
            ctx.set_tensor_address(spec.name, out.data_ptr())
            results[spec.name] = out
        if not ctx.execute_async_v3(handle):
            raise MllamaExportError(f"TensorRT failed to run the {self.label} engine")
        return results

    # -- helpers --

    def _put(self, name: str, value):
        torch = self._torch
        dtype = self._dtypes[name]
        if isinstance(value, torch.Tensor):
            tensor = value
        else:
            array = np.ascontiguousarray(value)
            if array.dtype.name == "bfloat16":  # ml_dtypes: torch reads the bits
                tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
            else:
                tensor = torch.from_numpy(array)
        if tensor.dtype != dtype:
            raise MllamaExportError(
                f"{self.label} input {name} is {str(tensor.dtype).replace('torch.', '')}; "
                f"the engine takes {str(dtype).replace('torch.', '')}"
            )
        where = torch.device("cpu") if name in self._on_host else self.device
        tensor = tensor.to(where).contiguous()
        if where.type != "cpu" and tensor.data_ptr() % _ALIGNMENT:
            tensor = tensor.clone()
        return tensor

    def _torch_dtype(self, trt_dtype):
        name = _DTYPES.get(getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1]))
        if name is None or not hasattr(self._torch, name):
            raise MllamaExportError(f"{self.label} engine uses {trt_dtype}, which torch lacks")
        return getattr(self._torch, name)

    def _check_engine(self, path) -> None:
        """The engine must be the graph the contract describes, with the manifest's profiles."""
        trt, engine = self._trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        found_in = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        found_out = set(names) - found_in
        want_in, want_out = {s.name for s in self.inputs}, {s.name for s in self.outputs}
        if (found_in, found_out) != (want_in, want_out):
            raise MllamaExportError(
                f"{path} has inputs {sorted(found_in)} and outputs {sorted(found_out)}; the "
                f"backend expects inputs {sorted(want_in)} and outputs {sorted(want_out)}"
            )
        if engine.num_optimization_profiles != len(self.profiles):
            raise MllamaExportError(
                f"{path} has {engine.num_optimization_profiles} optimization profiles; the "
                f"manifest describes {len(self.profiles)}: rebuild the engines"
            )
        for index, profile in enumerate(self.profiles):
            for name, shapes in profile.shapes.items():
                built = tuple(
                    tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, index)
                )
                if built != shapes:
                    raise MllamaExportError(
                        f"{path}: profile {index} of {name} is {[list(s) for s in built]} in "
                        f"the engine but {[list(s) for s in shapes]} in the manifest"
                    )


def _host(torch, tensor) -> np.ndarray:
    tensor = tensor.cpu()  # on the backend's stream: waits for the engine to finish
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def tensorrt_backends(
    folder: str | Path,
    manifest: dict,
    graph_specs: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]],
    device: str = "cuda",
    device_outputs: bool = True,
) -> list[TensorRTBackend]:
    """One backend per graph of `graph_specs` ({name: (INPUTS, OUTPUTS)}, in order), from a
    manifest whose files the caller has already verified. device 'cpu' (the CLI's default,
    an ONNX Runtime setting) means the default CUDA device here."""
    entry = manifest.get("tensorrt") or {}
    if not entry.get("built"):
        reason = entry.get("reason", "no engines in the manifest")
        raise MllamaExportError(f"{folder} has no TensorRT engines: {reason}")
    folder = Path(folder)
    backends = []
    for name, (inputs, outputs) in graph_specs.items():
        engine = entry.get("engines", {}).get(name)
        profiles = entry.get("profiles", {}).get(name)
        if engine is None or not profiles:
            raise MllamaExportError(f"{folder}: the manifest has no {name} engine or profiles")
        backends.append(
            TensorRTBackend(
                folder / engine["file"],
                inputs,
                outputs,
                [ShapeProfile.from_json(p) for p in profiles],
                device,
                device_outputs=device_outputs,
            )
        )
    return backends
