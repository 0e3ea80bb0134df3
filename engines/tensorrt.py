"""TensorRT backend: one engine per graph, several optimization profiles, I/O on the GPU.

Contract (the same `infer(feed) -> outputs` as every backend, engines/backend.py):

- `feed` maps every input name of the graph to a numpy array or a torch tensor (CUDA or CPU)
  of the engine's dtype. Host arrays are copied to the device; CUDA tensors are bound by
  pointer, never copied (a misaligned or non-contiguous view is made contiguous first).
- The optimization profile is chosen per call with `shapes.select_profile` (the smallest
  profile containing the call's shapes; a call outside every profile raises
  MllamaExportError naming the shapes and the ranges), switched only when it changes.
- Everything (host-to-device copies, output allocation, the engine, device-to-host copies)
  runs on the backend's own CUDA stream (given at construction, else a new
  torch.cuda.Stream), never the legacy default stream: TensorRT's header says "Using default
  stream may lead to performance issues due to additional cudaDeviceSynchronize() calls"
  (NvInferRuntime.h, enqueueV3). The stream waits for the caller's current stream before a
  call, and the caller's stream waits for it before reading device outputs. Outputs are
  fresh tensors from torch's caching allocator, so they may be kept across calls.
- Execution contexts are created with ExecutionContextAllocationStrategy.USER_MANAGED and
  run in a `DeviceScratch` buffer: the three backends of an artifact folder share one, sized
  for the largest engine (ICudaEngine.device_memory_size_v2), since they run one after
  another on one stream (IExecutionContext::setDeviceMemoryV2: the memory is in use from
  enqueueV3 until the work completes; only parallel use is undefined).
- Outputs are torch CUDA tensors when `device_outputs` is True, or when it is None (the
  default) and any input was a torch tensor; numpy arrays otherwise (after the stream
  finishes). With `device_outputs=True` the backend also has a `store` (engines/store.py),
  through which the runner keeps its caches on the GPU: the decode loop then passes device
  caches in and gets device K/V out, and only the logits of the last position cross to the
  host each step.

Engines are deserialized through a stream reader from files whose sha256 the caller has
already checked against the manifest (artifacts.load_artifacts does, before any backend is
made), never read whole into host memory: IStreamReaderV2 on TensorRT 10.7 and later (the
only reader 11.x has), IStreamReader on 10.0 to 10.6 (`deserialize_engine`). TensorRT is
imported lazily; without it, constructing a backend raises MllamaExportError in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.spec import TensorSpec

from .backend import check_feed
from .shapes import ShapeProfile, coverage, select_profile
from .store import to_numpy, to_torch, torch_dtype

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


# Each read hands TensorRT at most this much: the binding copies it onward and asks again
# (PyStreamReaderV2::read loops until the request is met, pyCore.cpp at 10.7 through 11.1).
READ_CHUNK = 64 << 20


def deserialize_engine(trt, runtime, path: str | Path):
    """An ICudaEngine from `path` through a stream reader, never the whole file in memory:
    IStreamReaderV2 (TensorRT 10.7+, the only reader 11.x has: read(size, stream), seek),
    else IStreamReader (10.0 to 10.6: read(size)). Refuses a file TensorRT cannot read."""
    path = Path(path)
    base = getattr(trt, "IStreamReaderV2", None) or getattr(trt, "IStreamReader", None)
    if base is None:
        raise MllamaExportError(
            f"TensorRT {trt.__version__} has neither IStreamReaderV2 nor IStreamReader; "
            "mllama-export needs TensorRT 10.0 or later"
        )
    try:
        file = path.open("rb")
    except OSError as err:
        raise MllamaExportError(f"cannot read the engine {path}: {err}") from err
    with file:
        reader = _reader(trt, base, file)
        engine = runtime.deserialize_cuda_engine(reader)
    if engine is None:
        raise MllamaExportError(
            f"TensorRT {trt.__version__} cannot deserialize {path}: built by another "
            "TensorRT version or for another GPU? Rebuild it (mllama-export engines DIR)"
        )
    return engine


def _reader(trt, base, file):
    """A reader over `file` deriving from TensorRT's own reader class (pybind11 trampolines
    need the base __init__ called, as Polygraphy's FileReader does)."""
    v2 = base is getattr(trt, "IStreamReaderV2", None)

    class EngineReader(base):
        def __init__(self):
            base.__init__(self)

        if v2:

            def read(self, size: int, stream: int) -> bytes:
                return file.read(min(size, READ_CHUNK))

            def seek(self, offset: int, where) -> bool:
                whence = {"SET": 0, "CUR": 1, "END": 2}[getattr(where, "name", str(where))]
                file.seek(offset, whence)
                return True

        else:

            def read(self, size: int) -> bytes:
                return file.read(size)

    return EngineReader()


def _scratch_size(engine) -> int:
    """The most device memory the engine's context needs over all profiles:
    device_memory_size_v2 (10.1+, the only one 11.x has), else device_memory_size (10.0)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


class DeviceScratch:
    """One device buffer for the scratch memory of several execution contexts that run one
    after another on one stream (USER_MANAGED allocation): the largest one's worth, not the
    sum. A context binds the buffer before it runs; a larger reservation replaces the buffer
    and bumps `generation`, so every context rebinds at its next run."""

    def __init__(self, allocate):
        self._allocate = allocate
        self.size, self.buffer, self.generation = 0, None, 0

    def reserve(self, size: int) -> None:
        if size > self.size:
            self.buffer = self._allocate(size)
            self.size, self.generation = size, self.generation + 1

    def bind(self, context) -> None:
        pointer = self.buffer.data_ptr() if self.buffer is not None else 0
        if hasattr(context, "set_device_memory"):  # setDeviceMemoryV2, TensorRT 10.1+
            context.set_device_memory(pointer, self.size)
        else:  # TensorRT 10.0: the write-only property (setDeviceMemory)
            context.device_memory = pointer


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
        scratch: DeviceScratch | None = None,
    ):
        trt = import_tensorrt()
        import torch

        self._trt, self._torch = trt, torch
        self.inputs, self.outputs = inputs, outputs
        self.label = Path(engine_path).stem
        self.profiles = list(profiles)
        self.device = self._resolve_device(device)
        self.device_outputs = device_outputs
        self.store = None
        if device_outputs:
            from .store import TorchStore

            self.store = TorchStore(str(self.device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with self._device_scope():
            self._stream = stream if stream is not None else self._new_stream()
            self._handle(self._stream)  # refuses the legacy default stream up front
            self.engine = deserialize_engine(trt, self._runtime, engine_path)
        self._check_engine(engine_path)
        self._scratch = scratch if scratch is not None else DeviceScratch(self._allocate)
        self._scratch.reserve(_scratch_size(self.engine))
        with self._device_scope():
            strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            self.context = self.engine.create_execution_context(strategy)
        if self.context is None:
            raise MllamaExportError(
                f"TensorRT cannot create an execution context for {engine_path} "
                "(out of device memory?)"
            )
        self._bound: int | None = None  # the scratch generation the context points at
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

    @property
    def max_step_tokens(self) -> int | None:
        """The most new tokens one call takes: the step (decode) graph's engine only, 1 for a
        split decode engine, its profiles' top for a shared one (the runner prefills longer
        prompts in chunks of this many); None for an engine of another graph."""
        return coverage(self.profiles).get("new_tokens", (None, None))[1]

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

    def _new_stream(self):
        return self._torch.cuda.Stream(self.device)

    def _caller_stream(self):
        return self._torch.cuda.current_stream(self.device)

    def _on_stream(self, stream) -> AbstractContextManager:
        return self._torch.cuda.stream(stream)

    def _keep_for(self, tensor, stream) -> None:
        """The caching allocator must not reuse `tensor` before `stream`'s work on it ends."""
        tensor.record_stream(stream)

    def _allocate(self, size: int):
        """Device bytes from torch's caching allocator (aligned to 512 bytes, beyond the
        CUDA alignment setDeviceMemoryV2 asks for), on the backend's stream."""
        with self._device_scope(), self._on_stream(self._stream):
            return self._torch.empty(size, dtype=self._torch.uint8, device=self.device)

    def _handle(self, stream) -> int:
        handle = int(stream.cuda_stream)
        if handle == 0:  # the legacy default stream: TensorRT synchronizes the device on it
            raise MllamaExportError(
                f"the {self.label} engine was given the default CUDA stream; pass a "
                "torch.cuda.Stream() of its own (or none: the backend makes one)"
            )
        return handle

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
            caller, stream = self._caller_stream(), self._stream
            stream.wait_stream(caller)  # start after the caller's work on its inputs
            with self._on_stream(stream):
                results = self._run(feed, index, stream)
            if as_torch:
                caller.wait_stream(stream)  # the caller's stream reads them next
                for tensor in results.values():
                    self._keep_for(tensor, caller)
                return results
            with self._on_stream(stream):  # the copies to the host wait for the engine
                return {name: to_numpy(t) for name, t in results.items()}

    def _run(self, feed: dict, index: int, stream) -> dict:
        torch, handle = self._torch, self._handle(stream)
        bound = {s.name: self._put(s.name, feed[s.name]) for s in self.inputs}
        for s in self.inputs:  # the caller's own tensors, read on our stream
            if isinstance(feed[s.name], torch.Tensor) and bound[s.name].is_cuda:
                self._keep_for(bound[s.name], stream)
        ctx = self.context
        if self._bound != self._scratch.generation:
            self._scratch.bind(ctx)
            self._bound = self._scratch.generation
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
        tensor = value if isinstance(value, torch.Tensor) else to_torch(value)
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
        dtype = None if name is None else torch_dtype(name)
        if dtype is None:
            raise MllamaExportError(f"{self.label} engine uses {trt_dtype}, which torch lacks")
        return dtype

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


def tensorrt_backends(
    folder: str | Path,
    manifest: dict,
    graph_specs: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]],
    device: str = "cuda",
    device_outputs: bool = True,
) -> list[TensorRTBackend | None]:
    """One backend per graph of `graph_specs` ({name: (INPUTS, OUTPUTS)}, in order), from a
    manifest whose files the caller has already verified; None for the prefill graph of a
    shared text engine (`text_engine` "shared": the decode engine serves prefill). device
    'cpu' (the CLI's default, an ONNX Runtime setting) means the default CUDA device here."""
    entry = manifest.get("tensorrt") or {}
    if not entry.get("built"):
        reason = entry.get("reason", "no engines in the manifest")
        raise MllamaExportError(f"{folder} has no TensorRT engines: {reason}")
    folder = Path(folder)
    backends: list[TensorRTBackend | None] = []
    shared: dict[str, Any] = {}  # one stream and one scratch buffer for all of them
    for name, (inputs, outputs) in graph_specs.items():
        if entry.get("text_engine") == "shared" and name == "prefill":
            backends.append(None)
            continue
        engine = entry.get("engines", {}).get(name)
        profiles = entry.get("profiles", {}).get(name)
        if engine is None or not profiles:
            raise MllamaExportError(f"{folder}: the manifest has no {name} engine or profiles")
        backend = TensorRTBackend(
            folder / engine["file"],
            inputs,
            outputs,
            [ShapeProfile.from_json(p) for p in profiles],
            device,
            device_outputs=device_outputs,
            **shared,
        )
        shared = {"stream": backend._stream, "scratch": backend._scratch}
        backends.append(backend)
    return backends
