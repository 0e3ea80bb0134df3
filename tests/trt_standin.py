"""A CPU stand-in for TensorRT 11.1, for the build and the runtime, that refuses what TensorRT
11 refuses (and what this project must never do on 10 either), so that a regression fails
the suite on a machine without TensorRT.

Build (Polygraphy's loaders replaced by recorders bound to the installed Polygraphy's real
signatures): a weakly typed network is refused; CreateConfig's fp16/bf16/int8/fp8 flags
fail as Polygraphy fails on TensorRT 11, whose BuilderFlag has no FP16/BF16
(`"fp16 in CreateConfig is not available on TensorRT version 11.1.0."`); every tensor of the
network is shape-inferred (ONNX shape inference) at every profile's maximum and one over
2^31-1 elements fails the build with TensorRT's message; a failure can be injected per
graph. Failures reach our code as TensorRT's do: an error line through Polygraphy's logger,
then Polygraphy's "Invalid Engine" exception.

Runtime (a stand-in `tensorrt` module): engines are deserialized only through an
IStreamReaderV2 whose base __init__ ran (a whole-file buffer is refused); contexts must be
USER_MANAGED and given device memory of at least device_memory_size_v2 before running; a
call on stream 0 is refused; the engine runs the ONNX file in ONNX Runtime through the bound
addresses and refuses shapes outside the active profile; its engine inspector reports a
MatMul as an FP8 GEMM where both inputs come from FP8 DequantizeLinear nodes.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import itertools
import json
import struct
import types
from pathlib import Path

import numpy as np
import torch

from mllama_export.engines.profiles import ShapeProfile
from mllama_export.engines.tensorrt import TensorRTBackend

VERSION = "11.1.0"
CAP = 2**31 - 1
MAGIC = b"TRT-STAND-IN"
_ORT_TYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64"}
_NP_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64}
SCRATCH = {"vision": 3000, "prefill": 9000, "decode": 5000}  # device_memory_size_v2


def engine_bytes(onnx: Path, profiles: list[dict], graph: str) -> bytes:
    body = json.dumps({"onnx": str(onnx), "profiles": profiles, "graph": graph}).encode()
    return MAGIC + struct.pack("<Q", len(body)) + body


class PolygraphyError(Exception):
    """What Polygraphy raises (G_LOGGER.critical raises PolygraphyException)."""


# ------------------------------------------------------------------------------ runtime


class _Context:
    def __init__(self, engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.profile, self.switches, self.runs, self.streams = 0, [], [], set()
        self.shapes, self.addresses, self._outputs = {}, {}, None
        self.memory: tuple[int, int] | None = None

    def set_device_memory(self, memory, size):
        self.memory = (int(memory), int(size))

    def set_optimization_profile_async(self, index, stream):
        if int(stream) == 0:
            raise RuntimeError("stand-in: set_optimization_profile_async on the default stream")
        self.profile, self.shapes, self._outputs = index, {}, None
        self.switches.append(index)
        return 0 <= index < self.engine.num_optimization_profiles

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile].shapes[name]
        ok = len(shape) == len(lo) and all(
            a <= x <= b for a, x, b in zip(lo, shape, hi, strict=True)
        )
        if ok:
            self.shapes[name], self._outputs = tuple(shape), None
        return ok

    def set_tensor_address(self, name, address):
        assert address, name
        self.addresses[name] = address

    def _read(self, name):
        dtype = np.dtype(_NP_TYPES[self.engine.dtypes[name]])
        shape = self.shapes[name]
        size = int(np.prod(shape)) * dtype.itemsize
        raw = (ctypes.c_char * size).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype).reshape(shape).copy()

    def _run(self):
        feed = {n: self._read(n) for n in self.engine.inputs}
        return dict(zip(self.engine.outputs, self.engine.session.run(None, feed), strict=True))

    def get_tensor_shape(self, name):
        if self._outputs is None:
            self._outputs = self._run()
        return self._outputs[name].shape

    def execute_async_v3(self, stream_handle):
        if int(stream_handle) == 0:
            raise RuntimeError("stand-in: execute_async_v3 on the legacy default stream")
        need = self.engine.device_memory_size_v2
        if self.memory is None or self.memory[1] < need or (need and not self.memory[0]):
            raise RuntimeError(
                f"stand-in: a USER_MANAGED context ran without {need} bytes of device memory"
            )
        assert set(self.shapes) == set(self.engine.inputs)
        for name, array in self._run().items():
            array = np.ascontiguousarray(array)
            ctypes.memmove(self.addresses[name], array.ctypes.data, array.nbytes)
        self.runs.append(self.profile)
        self.streams.add(int(stream_handle))
        return True


class _Inspector:
    def __init__(self, engine):
        self.engine = engine

    def get_engine_information(self, fmt):
        assert fmt == "JSON", fmt
        return json.dumps({"Layers": onnx_layers(self.engine.onnx), "Bindings": []})


def onnx_layers(onnx_file: str) -> list[dict]:
    """Layer information as TensorRT's inspector gives it, for the graph's MatMuls: an FP8
    GEMM where both inputs are dequantized from FP8 (explicit quantization fused), else a
    16/32-bit one."""
    import onnx

    model = onnx.load(onnx_file, load_external_data=False)
    producer = {out: n for n in model.graph.node for out in n.output}
    fp8_inits = {
        i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN
    }

    def fp8(name):
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return False
        source = producer.get(node.input[0])
        return node.input[0] in fp8_inits or (
            source is not None and source.op_type == "QuantizeLinear"
        )

    layers = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            both = all(fp8(x) for x in node.input[:2])
            layers.append(
                {
                    "Name": node.name,
                    "LayerType": "gemm",
                    "Inputs": [
                        {"Name": x, "Format/Datatype": "Row major linear FP8" if both else "Half"}
                        for x in node.input[:2]
                    ],
                    "TacticName": "sm90_xmma_gemm_e4m3e4m3" if both else "sm90_xmma_gemm_f16f16",
                }
            )
        else:
            layers.append({"Name": node.name, "LayerType": node.op_type, "Inputs": []})
    return layers


class _Engine:
    def __init__(self, data: dict):
        import onnxruntime as ort

        self.onnx, self.graph = data["onnx"], data["graph"]
        options = ort.SessionOptions()  # BASIC: FP8 Q/DQ graphs run on the CPU at it only
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.session = ort.InferenceSession(
            data["onnx"], options, providers=["CPUExecutionProvider"]
        )
        self.profiles = [ShapeProfile.from_json(p) for p in data["profiles"]]
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        self.inputs, self.outputs = [i.name for i in ins], [o.name for o in outs]
        self.dtypes = {x.name: _ORT_TYPES[x.type] for x in (*ins, *outs)}
        self.num_io_tensors = len(self.dtypes)
        self.num_optimization_profiles = len(self.profiles)
        self.device_memory_size_v2 = SCRATCH.get(self.graph, 1000)
        self.contexts: list[_Context] = []

    def get_tensor_name(self, i):
        return [*self.inputs, *self.outputs][i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=self.dtypes[name])

    def get_tensor_profile_shape(self, name, index):
        return list(self.profiles[index].shapes[name])

    def create_execution_context(self, strategy=0):
        if strategy != "USER_MANAGED":
            raise RuntimeError(
                f"stand-in: the backend must share user-managed memory, got {strategy}"
            )
        self.contexts.append(_Context(self, strategy))
        return self.contexts[-1]

    def create_engine_inspector(self):
        return _Inspector(self)


def fake_tensorrt() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    # libraries probe importlib.util.find_spec("tensorrt"), which needs a spec
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(
        STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE", USER_MANAGED="USER_MANAGED"
    )
    trt.LayerInformationFormat = types.SimpleNamespace(ONELINE="ONELINE", JSON="JSON")
    trt.SeekPosition = types.SimpleNamespace(
        SET=types.SimpleNamespace(name="SET"),
        CUR=types.SimpleNamespace(name="CUR"),
        END=types.SimpleNamespace(name="END"),
    )

    class IStreamReaderV2:
        def __init__(self):
            self.base_initialized = True

    trt.IStreamReaderV2 = IStreamReaderV2
    reads: list[int] = []

    class Runtime:
        def __init__(self, logger):
            self.reads = reads

        def deserialize_cuda_engine(self, reader):
            if not isinstance(reader, IStreamReaderV2):
                raise TypeError(
                    "stand-in TensorRT: deserialize through an IStreamReaderV2, not a "
                    f"whole file in memory (got {type(reader).__name__})"
                )
            assert getattr(reader, "base_initialized", False), "the trampoline needs __init__"
            reader.seek(0, trt.SeekPosition.SET)
            head = _read(reader, len(MAGIC) + 8, reads)
            if head is None or head[: len(MAGIC)] != MAGIC:
                return None  # not an engine of this TensorRT: deserialization fails
            (size,) = struct.unpack("<Q", head[len(MAGIC) :])
            return _Engine(json.loads(_read(reader, size, reads)))

    trt.Runtime = Runtime
    return trt


def _read(reader, size: int, reads: list[int]) -> bytes | None:
    """As PyStreamReaderV2::read does: ask for what is left until it is all there; a read of
    nothing aborts (None)."""
    data = b""
    while len(data) < size:
        chunk = bytes(reader.read(size - len(data), 12345))
        if not chunk:
            return None
        assert len(chunk) <= size - len(data), "read returned more than asked"
        reads.append(len(chunk))
        data += chunk
    return data


# -------------------------------------------------------------------------------- build


def install_trt11(monkeypatch, failures: dict[str, str] | None = None):
    """TensorRT 11 on a Hopper GPU, stood in on the CPU: the module, a GPU of compute
    capability 9.0 as the engine stage sees it (torch itself stays on the CPU), Polygraphy's
    loaders (install_build_standin) and the runtime's backend on the CPU. Returns (the fake
    module, the list the build calls are recorded into)."""
    import sys

    from mllama_export.engines import tensorrt as trt_module
    from mllama_export.exporter import engine_stage

    fake = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(engine_stage, "cuda_device", lambda: ("Stand-in H100", (9, 0)))
    calls = install_build_standin(monkeypatch, failures)
    # the runtime on the CPU: artifacts' loaders make the CPU subclass of the real backend
    monkeypatch.setattr(trt_module, "TensorRTBackend", CpuTensorRTBackend)
    return fake, calls


def install_build_standin(monkeypatch, failures: dict[str, str] | None = None) -> list:
    """Polygraphy's TensorRT loaders replaced by recorders that enforce TensorRT 11's rules
    and write stand-in engines; returns the list the calls are recorded into."""
    import inspect

    import polygraphy.backend.trt as ptrt
    from polygraphy.logger import G_LOGGER

    failures = {} if failures is None else failures  # the caller edits it later
    calls: list[tuple[str, dict]] = []

    def bind(cls, args, kwargs) -> dict:
        """Arguments by name as cls.__init__ (and the bases its **kwargs reach) takes them;
        TypeError when our call does not fit."""
        named: dict = {}
        for klass in cls.__mro__:
            if "__init__" not in vars(klass):
                continue
            signature = inspect.signature(klass.__init__)
            bound = signature.bind(None, *args, **kwargs)
            rest = {}
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    rest = value
                elif name != "self":
                    named[name] = value
            if not rest:
                return named
            args, kwargs = (), rest
        raise TypeError(f"{cls.__name__} takes no arguments {sorted(kwargs)}")

    def fail(message: str):
        G_LOGGER.error(message)  # what Polygraphy's TensorRT logger does with TensorRT's errors
        G_LOGGER.critical("Invalid Engine. Please ensure the engine was built correctly")

    def network(a):
        if a.get("strongly_typed") is not True:
            raise PolygraphyError(
                "stand-in TensorRT 11.1: a weakly typed network (Since 11.0, TensorRT "
                "supports only Strongly Typed networks)"
            )
        return lambda: ("builder", _Network(Path(a["path"])), "parser")

    def config(a):
        for flag in ("fp16", "bf16", "int8", "fp8"):
            if a.get(flag):  # BuilderFlag.FP16/BF16 are gone from TensorRT 11's bindings
                raise PolygraphyError(
                    f"{flag} in CreateConfig is not available on TensorRT version {VERSION}."
                )
        return a

    def build(a):
        net = a["network"][1]
        cache = Path(a["save_timing_cache"])

        def run():
            graph = net.path.stem
            if graph in failures:
                fail(failures[graph])
            profiles = [{n: tuple(t) for n, t in p.items()} for p in a["config"]["profiles"]]
            for index, profile in enumerate(profiles):
                for name, shape in over_cap(net.path, {n: s[2] for n, s in profile.items()}):
                    fail(
                        f"[TRT] {name}: tensor volume exceeds {CAP}, dimensions are "
                        f"[{','.join(str(d) for d in shape)}] (profile {index})"
                    )
            with cache.open("ab") as f:
                f.write(b"+timings")
            Path(f"{cache}.lock").touch()
            return engine_bytes(net.path, a["config"]["profile_json"], graph)

        return run

    def recorder(real, result):
        def make(*args, **kwargs):
            arguments = bind(real, args, kwargs)
            calls.append((real.__name__, arguments))
            return result(arguments)

        return make

    class _Profile(dict):
        def add(self, name, min, opt, max):  # noqa: A002 - Polygraphy's own names
            self[name] = (tuple(min), tuple(opt), tuple(max))
            return self

    def config_with_json(a):
        config(a)
        return {**a, "profile_json": _profile_json(a["profiles"])}

    monkeypatch.setattr(ptrt, "Profile", _Profile)
    monkeypatch.setattr(ptrt, "NetworkFromOnnxPath", recorder(ptrt.NetworkFromOnnxPath, network))
    monkeypatch.setattr(ptrt, "CreateConfig", recorder(ptrt.CreateConfig, config_with_json))
    monkeypatch.setattr(
        ptrt, "EngineBytesFromNetwork", recorder(ptrt.EngineBytesFromNetwork, build)
    )
    return calls


def _profile_json(profiles) -> list[dict]:
    """The stand-in engine records its profiles in the manifest's JSON form."""
    out = []
    for index, p in enumerate(profiles):
        inputs = {
            name: {"dims": [], "min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
            for name, s in p.items()
        }
        out.append({"graph": "?", "index": index, "dims": {}, "inputs": inputs})
    return out


class _Network:
    def __init__(self, path: Path):
        import onnx

        self.path = path
        model = onnx.load(str(path), load_external_data=False)
        names = {1: "FLOAT", 10: "HALF", 16: "BF16", 7: "INT64"}

        def describe(v):
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            return types.SimpleNamespace(
                name=v.name, dtype=f"DataType.{names[t.elem_type]}", shape=dims
            )

        self._inputs = [describe(v) for v in model.graph.input]
        self._outputs = [describe(v) for v in model.graph.output]
        self.num_inputs, self.num_outputs = len(self._inputs), len(self._outputs)

    def get_input(self, i):
        return self._inputs[i]

    def get_output(self, i):
        return self._outputs[i]


def over_cap(onnx_file: Path, max_shapes: dict[str, tuple]) -> list[tuple[str, tuple]]:
    """Every tensor of the graph over CAP elements with its inputs at `max_shapes`, by ONNX
    shape inference: what TensorRT's builder checks on the network's tensors."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    for value in model.graph.input:
        for dim, size in zip(value.type.tensor_type.shape.dim, max_shapes[value.name], strict=True):
            dim.Clear()
            dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    found = []
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shape = tuple(d.dim_value for d in dims)
            if int(np.prod(shape, dtype=np.float64)) > CAP:
                found.append((value.name, shape))
    return found


# --------------------------------------------------------------- the backend on the CPU


class FakeStream:
    """A CUDA stream as the backend uses it: a handle and wait_stream."""

    _handles = itertools.count(0x7F00)

    def __init__(self, handle: int | None = None):
        self.cuda_stream = next(self._handles) if handle is None else handle
        self.waited: list[FakeStream] = []

    def wait_stream(self, other):
        self.waited.append(other)


DEFAULT_STREAM = FakeStream(0)  # what torch.cuda.current_stream() is unless the caller set one


class CpuTensorRTBackend(TensorRTBackend):
    """The real backend with its device hooks pointed at the CPU: host memory for the device,
    stand-in streams (the caller on the default stream, as usual), no record_stream."""

    def _resolve_device(self, device):
        return torch.device("cpu")

    def _device_scope(self):
        return contextlib.nullcontext()

    def _new_stream(self):
        return FakeStream()

    def _caller_stream(self):
        return DEFAULT_STREAM

    def _on_stream(self, stream):
        return contextlib.nullcontext()

    def _keep_for(self, tensor, stream):
        pass

    def _allocate(self, size):
        return torch.empty(size, dtype=torch.uint8)


def write_engine(folder: Path, name: str, onnx: Path, profiles) -> Path:
    """A stand-in engine file, as the stand-in build writes them."""
    path = folder / f"{name}.engine"
    path.write_bytes(engine_bytes(onnx, [p.to_json() for p in profiles], name))
    return path
