"""TensorRT engines: the build without TensorRT (trtexec.sh, the manifest entry), the backend's
mechanics against a stand-in engine on the CPU, and, where TensorRT and a GPU exist, real
engines against ONNX Runtime on the same ONNX files."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mllama_export.engines.onnxrt import OnnxRuntimeBackend
from mllama_export.engines.profiles import ShapeProfile, all_profiles
from mllama_export.engines.runner import Limits, Runner
from mllama_export.engines.tensorrt import TensorRTBackend, tensorrt_backends
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.engines import (
    TIMING_CACHE,
    TRTEXEC_SCRIPT,
    _reuse_timing_cache,
    build_engines,
    plan_engines,
)
from mllama_export.exporter.manifest import read_manifest
from mllama_export.exporter.onnx_export import example_inputs
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.config import MllamaConfig, preset
from mllama_export.graphs.model import DecodeGraph, PrefillGraph, VisionGraph

GRAPHS = {"vision": VisionGraph, "prefill": PrefillGraph, "decode": DecodeGraph}
SPECS = {name: (cls.INPUTS, cls.OUTPUTS) for name, cls in GRAPHS.items()}
TINY = preset("tiny")
ONNX = {name: {"file": f"onnx/{name}.onnx"} for name in GRAPHS}


def _tensorrt_here() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


NO_TENSORRT = _tensorrt_here()
needs_tensorrt = pytest.mark.skipif(
    NO_TENSORRT is not None, reason=f"needs TensorRT and a CUDA GPU: {NO_TENSORRT}"
)


# ---------------------------------------------------------------- build without TensorRT


@pytest.fixture
def no_tensorrt(monkeypatch):
    """As on a machine without TensorRT, even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def options_for(out: Path, precision="fp32", batch=4, seq=512, images=2) -> BuildOptions:
    return BuildOptions(
        model="tiny",
        out=out,
        precision=precision,
        max_batch=batch,
        max_seq_len=seq,
        max_images=images,
    )


def parse_shapes(spec: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for item in spec.split(","):
        name, dims = item.rsplit(":", 1)
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


def parse_profiles(args: list[str]) -> list[dict[str, tuple]]:
    """trtexec's --profile=N --minShapes=.. --optShapes=.. --maxShapes=.. groups, in order."""
    profiles = []
    for i, arg in enumerate(args):
        if arg.startswith("--profile="):
            assert int(arg.split("=")[1]) == len(profiles)
            keys = [a.split("=", 1)[0] for a in args[i + 1 : i + 4]]
            assert keys == ["--minShapes", "--optShapes", "--maxShapes"]
            shapes = [parse_shapes(a.split("=", 1)[1]) for a in args[i + 1 : i + 4]]
            profiles.append({n: tuple(s[n] for s in shapes) for n in shapes[0]})
    return profiles


def run_script(folder: Path, tmp_path: Path, *graphs: str, flags: str = "") -> list[dict]:
    """Runs engines/trtexec.sh with a stand-in trtexec that records its argv and cwd."""
    log = tmp_path / "trtexec.log"
    log.unlink(missing_ok=True)
    fake = tmp_path / "fake-trtexec"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "with open(os.environ['FAKE_LOG'], 'a') as f:\n"
        "    f.write(json.dumps({'cwd': os.getcwd(), 'args': sys.argv[1:]}) + '\\n')\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "TRTEXEC": str(fake), "FAKE_LOG": str(log), "TRTEXEC_FLAGS": flags}
    import subprocess

    done = subprocess.run(
        ["sh", str(folder / TRTEXEC_SCRIPT), *graphs],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
@pytest.mark.parametrize(
    ("precision", "flag"), [("fp32", None), ("fp16", "--fp16"), ("bf16", "--bf16")]
)
def test_without_tensorrt_build_writes_trtexec_sh_matching_the_profiles(
    no_tensorrt, tmp_path, precision, flag
):
    folder = tmp_path / "art"
    folder.mkdir()
    messages = []
    options = options_for(folder, precision, batch=3, seq=300, images=2)
    result = build_engines(folder, ONNX, TINY, options, messages.append)
    assert result["built"] is False
    assert result["reason"].startswith("TensorRT is not installed")
    assert "\n" not in result["reason"] and TRTEXEC_SCRIPT in result["reason"]
    assert messages == [f"no TensorRT engines built: {result['reason']}"]
    assert "engines" not in result and result["trtexec"] == TRTEXEC_SCRIPT
    assert sorted(p.name for p in (folder / "engines").iterdir()) == ["trtexec.sh"]
    json.dumps(result)  # goes into manifest.json as it is

    expected = all_profiles(TINY, options)
    assert result["profiles"] == {g: [p.to_json() for p in ps] for g, ps in expected.items()}
    calls = run_script(folder, tmp_path)
    assert [Path(c["cwd"]).resolve() for c in calls] == [folder.resolve()] * 3
    for call, graph in zip(calls, ("vision", "prefill", "decode"), strict=True):
        args = call["args"]
        assert f"--onnx=onnx/{graph}.onnx" in args
        assert f"--saveEngine=engines/{graph}.engine" in args
        assert f"--timingCacheFile={TIMING_CACHE}" in args
        assert "--noTF32" in args and "--skipInference" in args
        assert "--stronglyTyped" not in args
        assert [a for a in args if a in ("--fp16", "--bf16")] == ([flag] if flag else [])
        parsed = parse_profiles(args)
        assert parsed == [p.shapes for p in expected[graph]]
        from_json = [ShapeProfile.from_json(p).shapes for p in result["profiles"][graph]]
        assert parsed == from_json


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
def test_trtexec_sh_builds_one_graph_with_extra_flags_and_fp8_strongly_typed(no_tensorrt, tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    graphs = {**ONNX, "decode": {"file": "onnx/decode.onnx", "precision": "fp8"}}
    build_engines(folder, graphs, TINY, options_for(folder, "bf16"), lambda m: None)
    (call,) = run_script(folder, tmp_path, "decode", flags="--verbose")
    args = call["args"]
    assert args[0] == "--verbose" and "--onnx=onnx/decode.onnx" in args
    assert "--stronglyTyped" in args and "--bf16" not in args and "--fp16" not in args
    assert len(parse_profiles(args)) == len(all_profiles(TINY, options_for(folder))["decode"])
    plans = plan_engines(graphs, TINY, options_for(folder, "bf16"))
    assert [(p.graph, p.strongly_typed, p.flags) for p in plans] == [
        ("vision", False, ("bf16",)),
        ("prefill", False, ("bf16",)),
        ("decode", True, ()),
    ]


def test_unknown_precision_and_graph_are_refused(tmp_path):
    with pytest.raises(MllamaExportError, match="precision 'int4'"):
        plan_engines(ONNX, TINY, options_for(tmp_path, "int4"))
    with pytest.raises(MllamaExportError, match="graph named 'text'"):
        plan_engines({"text": {"file": "x.onnx"}}, TINY, options_for(tmp_path))


def test_timing_cache_is_reused_only_from_the_same_tensorrt_and_gpu(tmp_path):
    old, work = tmp_path / "out", tmp_path / "work"
    (old / "engines").mkdir(parents=True)
    (work / "engines").mkdir(parents=True)
    (old / TIMING_CACHE).write_bytes(b"timings")
    info = {"tensorrt": {"version": "10.9", "device": "NVIDIA H100"}}
    (old / "manifest.json").write_text(json.dumps(info))
    _reuse_timing_cache(old, work, "10.8", "NVIDIA H100")
    assert not (work / TIMING_CACHE).exists()
    _reuse_timing_cache(old, work, "10.9", "NVIDIA H200")
    assert not (work / TIMING_CACHE).exists()
    _reuse_timing_cache(old, work, "10.9", "NVIDIA H100")
    assert (work / TIMING_CACHE).read_bytes() == b"timings"


def test_build_engines_calls_polygraphy_as_its_signatures_say(tmp_path, monkeypatch):
    """TensorRT is out of reach here, so Polygraphy's loaders are replaced by recorders that
    bind every call against the installed Polygraphy's real signatures."""
    import inspect

    import polygraphy.backend.trt as ptrt

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

    def recorder(real, result):
        def make(*args, **kwargs):
            arguments = bind(real, args, kwargs)
            calls.append((real.__name__, arguments))
            return result(arguments)

        return make

    def network(arguments):
        graph = Path(arguments["path"]).stem
        inputs = [
            types.SimpleNamespace(name=s.name, dtype="DataType.FLOAT", shape=[-1] * len(s.dims))
            for s in SPECS[graph][0]
        ]
        net = types.SimpleNamespace(
            num_inputs=len(inputs),
            get_input=inputs.__getitem__,
            num_outputs=0,
            get_output=None,
        )
        return lambda: ("builder", net, "parser")

    def engine_bytes(arguments):
        cache = Path(arguments["save_timing_cache"])

        def build():
            with cache.open("ab") as f:
                f.write(b"+timings")
            Path(f"{cache}.lock").touch()
            return b"engine"

        return build

    monkeypatch.setattr(ptrt, "NetworkFromOnnxPath", recorder(ptrt.NetworkFromOnnxPath, network))
    monkeypatch.setattr(ptrt, "CreateConfig", recorder(ptrt.CreateConfig, lambda a: "config"))
    monkeypatch.setattr(
        ptrt, "EngineBytesFromNetwork", recorder(ptrt.EngineBytesFromNetwork, engine_bytes)
    )
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.99"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")

    out, work = tmp_path / "out", tmp_path / "work"
    (out / "engines").mkdir(parents=True)
    (out / TIMING_CACHE).write_bytes(b"old")
    (out / "manifest.json").write_text(
        json.dumps({"tensorrt": {"version": "10.99", "device": "Stand-in GPU"}})
    )
    work.mkdir()
    graphs = {**ONNX, "decode": {"file": "onnx/decode.onnx", "precision": "fp8"}}
    options = options_for(out, "fp16")
    result = build_engines(work, graphs, TINY, options, lambda m: None)

    assert result["built"] and result["version"] == "10.99"
    assert result["device"] == "Stand-in GPU" and result["timing_cache"] == TIMING_CACHE
    assert (work / TIMING_CACHE).read_bytes() == b"old" + b"+timings" * 3  # reused, extended
    assert not (work / f"{TIMING_CACHE}.lock").exists()
    profiles = all_profiles(TINY, options)
    configs = [a for n, a in calls if n == "CreateConfig"]
    networks = [a for n, a in calls if n == "NetworkFromOnnxPath"]
    assert [Path(a["path"]).name for a in networks] == [
        "vision.onnx",
        "prefill.onnx",
        "decode.onnx",
    ]
    assert [a["strongly_typed"] for a in networks] == [False, False, True]
    assert [(a["fp16"], a["bf16"]) for a in configs] == [(True, False)] * 2 + [(False, False)]
    for graph, config in zip(GRAPHS, configs, strict=True):
        assert config["load_timing_cache"] == str(work / TIMING_CACHE)
        got = [{n: tuple(t) for n, t in p.items()} for p in config["profiles"]]
        assert got == [p.shapes for p in profiles[graph]]
        entry = result["engines"][graph]
        assert (work / entry["file"]).read_bytes() == b"engine"
        assert [i["name"] for i in entry["inputs"]] == [s.name for s in SPECS[graph][0]]
        assert entry["strongly_typed"] == (graph == "decode")
    json.dumps(result)


def test_backend_without_tensorrt_is_one_clear_line(no_tensorrt, tmp_path):
    with pytest.raises(MllamaExportError) as err:
        TensorRTBackend(tmp_path / "x.engine", *SPECS["decode"], [])
    assert "needs TensorRT and a CUDA GPU" in str(err.value) and "\n" not in str(err.value)
    manifest = {"tensorrt": {"built": False, "reason": "TensorRT is not installed"}}
    with pytest.raises(MllamaExportError, match="has no TensorRT engines: TensorRT is not"):
        tensorrt_backends(tmp_path, manifest, SPECS)


# ------------------------------------------ the backend's mechanics on a stand-in engine

_ORT_TYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64"}
_NP_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64}


class _FakeContext:
    """Keeps TensorRT's rules that matter here: a profile is chosen before shapes are set,
    shapes outside the active profile are refused, tensors are read and written by address."""

    def __init__(self, engine):
        self.engine, self.profile, self.switches, self.runs = engine, 0, [], []
        self.shapes, self.addresses, self._outputs = {}, {}, None

    def set_optimization_profile_async(self, index, stream):
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

    def execute_async_v3(self, stream):
        assert set(self.shapes) == set(self.engine.inputs)
        for name, array in self._run().items():
            array = np.ascontiguousarray(array)
            ctypes.memmove(self.addresses[name], array.ctypes.data, array.nbytes)
        self.runs.append(self.profile)
        return True


class _FakeEngine:
    def __init__(self, data: dict):
        import onnxruntime as ort

        self.session = ort.InferenceSession(data["onnx"], providers=["CPUExecutionProvider"])
        self.profiles = [ShapeProfile.from_json(p) for p in data["profiles"]]
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        self.inputs, self.outputs = [i.name for i in ins], [o.name for o in outs]
        self.dtypes = {x.name: _ORT_TYPES[x.type] for x in (*ins, *outs)}
        self.num_io_tensors = len(self.dtypes)
        self.num_optimization_profiles = len(self.profiles)
        self.contexts = []

    def get_tensor_name(self, i):
        return [*self.inputs, *self.outputs][i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=self.dtypes[name])

    def get_tensor_profile_shape(self, name, index):
        return list(self.profiles[index].shapes[name])

    def create_execution_context(self):
        self.contexts.append(_FakeContext(self))
        return self.contexts[-1]


def _fake_tensorrt() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "0-stand-in"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return _FakeEngine(json.loads(data))

    trt.Runtime = Runtime
    return trt


class CpuTensorRTBackend(TensorRTBackend):
    """The real backend with its device hooks pointed at the CPU."""

    def _resolve_device(self, device):
        return torch.device("cpu")

    def _device_scope(self):
        return contextlib.nullcontext()

    def _streams(self):
        return None, None

    def _handle(self, stream):
        return 0


@pytest.fixture(scope="module")
def stand_in(ort_artifacts, tmp_path_factory):
    """Stand-in engine files for the tiny artifacts: the ONNX file and the profiles."""
    manifest = read_manifest(ort_artifacts)
    limits = Limits(**manifest["limits"])
    profiles = all_profiles(config_of(manifest), limits)
    folder = tmp_path_factory.mktemp("stand-in")
    for name in GRAPHS:
        data = {
            "onnx": str(ort_artifacts / manifest["graphs"][name]["file"]),
            "profiles": [p.to_json() for p in profiles[name]],
        }
        (folder / f"{name}.engine").write_text(json.dumps(data))
    return folder, profiles, manifest


def config_of(manifest) -> MllamaConfig:
    return MllamaConfig.from_hf_dict(manifest["model"]["config"])


@pytest.fixture
def fake_trt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())


def cpu_backend(stand_in, name, **kw) -> CpuTensorRTBackend:
    folder, profiles, _ = stand_in
    return CpuTensorRTBackend(folder / f"{name}.engine", *SPECS[name], profiles[name], **kw)


def random_feed(name, config, sizes, seed=0) -> dict[str, np.ndarray]:
    inputs = SPECS[name][0]
    full = {"batch": 1, "num_images": 1, "sequence": 1, "past_sequence": 1, **sizes}
    args = example_inputs(inputs, config, torch.float32, full, seed=seed)
    return {s.name: a.numpy() for s, a in zip(inputs, args, strict=True)}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# one call per profile region, in an order that switches profile at every call but one
POINTS = {
    "vision": [
        {"batch": 1, "num_images": 1},
        {"batch": 1, "num_images": 2},
        {"batch": 3, "num_images": 2},
        {"batch": 4, "num_images": 2},
        {"batch": 2, "num_images": 1},
    ],
    "prefill": [
        {"batch": 2, "sequence": 5},
        {"batch": 1, "sequence": 64},
        {"batch": 2, "sequence": 65, "num_images": 2},
        {"batch": 1, "sequence": 300},
    ],
    "decode": [
        {"batch": 1, "past_sequence": 9},
        {"batch": 1, "past_sequence": 256},
        {"batch": 1, "past_sequence": 257},
        {"batch": 4, "past_sequence": 300, "num_images": 2},
        {"batch": 2, "past_sequence": 12},
    ],
}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_stand_in_engine_switches_profiles_and_matches_onnxruntime(fake_trt, stand_in, name):
    folder, profiles, manifest = stand_in
    config = config_of(manifest)
    backend = cpu_backend(stand_in, name)
    ort = OnnxRuntimeBackend(
        Path(json.loads((folder / f"{name}.engine").read_text())["onnx"]), *SPECS[name]
    )
    context = backend.engine.contexts[0]
    expected_switches = []
    for seed, point in enumerate(POINTS[name]):
        feed = random_feed(name, config, point, seed)
        out = backend.infer(feed)
        ref = ort.infer(feed)
        for key in ref:
            assert isinstance(out[key], np.ndarray)
            assert out[key].shape == ref[key].shape and rel_l2(out[key], ref[key]) < 1e-6
        index = next(
            i
            for i, p in enumerate(profiles[name])
            if all(p.ranges[d][0] <= v <= p.ranges[d][2] for d, v in point.items() if d in p.ranges)
        )
        if not expected_switches or expected_switches[-1] != index:
            expected_switches.append(index)
        assert context.runs[-1] == index
    assert context.switches == expected_switches
    assert len(set(expected_switches)) >= 3
    # the same shapes again: no switch, and the choice is remembered
    backend.infer(random_feed(name, config, POINTS[name][-1]))
    assert context.switches == expected_switches


def test_stand_in_engine_refuses_calls_outside_every_profile(fake_trt, stand_in):
    backend = cpu_backend(stand_in, "decode")
    config = config_of(stand_in[2])
    with pytest.raises(MllamaExportError, match="past_sequence 513 outside 1..512"):
        backend.infer(random_feed("decode", config, {"past_sequence": 513}))
    with pytest.raises(MllamaExportError, match="batch 5 outside 1..4"):
        backend.infer(random_feed("decode", config, {"batch": 5, "past_sequence": 3}))
    assert backend.engine.contexts[0].runs == []
    feed = random_feed("decode", config, {"past_sequence": 3})
    feed["input_ids"] = feed["input_ids"].astype(np.int32)
    with pytest.raises(MllamaExportError, match="input_ids is int32; the engine takes int64"):
        backend.infer(feed)


def test_stand_in_engine_returns_torch_for_torch_inputs(fake_trt, stand_in):
    config = config_of(stand_in[2])
    feed = random_feed("decode", config, {"batch": 2, "past_sequence": 20})
    backend = cpu_backend(stand_in, "decode")
    assert backend.store is None
    as_numpy = backend.infer(feed)
    mixed = {**feed, "past_key": torch.from_numpy(feed["past_key"])}
    as_torch = backend.infer(mixed)
    assert all(isinstance(v, torch.Tensor) for v in as_torch.values())
    for key, value in as_numpy.items():
        np.testing.assert_array_equal(as_torch[key].numpy(), value)
    bound = cpu_backend(stand_in, "decode", device_outputs=True)
    assert bound.store is not None
    assert all(isinstance(v, torch.Tensor) for v in bound.infer(feed).values())
    as_host = cpu_backend(stand_in, "decode", device_outputs=False).infer(mixed)
    assert all(isinstance(v, np.ndarray) for v in as_host.values())


def test_stand_in_engines_refuse_a_manifest_that_does_not_match(fake_trt, stand_in):
    folder, profiles, _ = stand_in
    with pytest.raises(MllamaExportError, match="has 6 optimization profiles; the manifest"):
        CpuTensorRTBackend(folder / "decode.engine", *SPECS["decode"], profiles["decode"][:2])
    with pytest.raises(MllamaExportError, match="the backend expects inputs"):
        CpuTensorRTBackend(folder / "decode.engine", *SPECS["prefill"], profiles["decode"])
    shifted = list(profiles["vision"])
    shifted[0], shifted[1] = shifted[1], shifted[0]
    with pytest.raises(MllamaExportError, match="profile 0 of pixel_values is"):
        CpuTensorRTBackend(folder / "vision.engine", *SPECS["vision"], shifted)


def test_runner_on_stand_in_engines_generates_what_onnxruntime_does(
    fake_trt, stand_in, ort_artifacts
):
    from conftest import random_images

    _, _, manifest = stand_in
    config = config_of(manifest)
    backends = [cpu_backend(stand_in, name, device_outputs=True) for name in GRAPHS]
    trt_runner = Runner(config, *backends, Limits(**manifest["limits"]), manifest["io_dtype"])
    ort_runner = Runner.from_artifacts(ort_artifacts, io_binding=False)
    assert isinstance(trt_runner.store.zeros((1,), np.dtype(np.float32)), torch.Tensor)
    img = config.image_token_id
    long = [500, img] + [20 + i % 400 for i in range(250)]  # 252 tokens + 12 new: 264 slots
    prompts = [long, [500, img, 30, 31]]
    images = random_images(config, [[6], [2]], seed=3)
    kw = dict(max_new_tokens=12, stop_tokens=set(), keep_logits=True)
    ours = trt_runner.generate_ids(prompts, images, **kw)
    ref = ort_runner.generate_ids(prompts, images, **kw)
    assert ours.token_ids == ref.token_ids
    for a, b in zip(ours.step_logits, ref.step_logits, strict=True):
        assert rel_l2(a, b) < 1e-5
    # one profile per stage: prompt 129..256 (prefill 2); batch 2, past 257..512 (decode 3)
    assert backends[1].engine.contexts[0].switches == [2]
    assert backends[2].engine.contexts[0].switches == [3]
    assert backends[2].engine.contexts[0].runs == [3] * 11


# --------------------------------------------------- real engines (TensorRT and a GPU)


@pytest.fixture(scope="module")
def trt_artifacts(ort_artifacts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt") / "tiny-hf"
    shutil.copytree(ort_artifacts, folder)
    manifest = read_manifest(folder)
    config = config_of(manifest)
    options = options_for(folder, manifest["precision"], **_limits(manifest))
    result = build_engines(folder, manifest["graphs"], config, options, lambda m: None)
    assert result["built"], result.get("reason")
    return folder, result, config, manifest


def _limits(manifest) -> dict:
    lim = manifest["limits"]
    return {"batch": lim["max_batch"], "seq": lim["max_seq_len"], "images": lim["max_images"]}


def trt_backend(trt_artifacts, name, **kw) -> TensorRTBackend:
    folder, result, _, _ = trt_artifacts
    profiles = [ShapeProfile.from_json(p) for p in result["profiles"][name]]
    engine = folder / result["engines"][name]["file"]
    return TensorRTBackend(engine, *SPECS[name], profiles, **kw)


@pytest.mark.tensorrt
@needs_tensorrt
def test_engine_build_for_each_graph(trt_artifacts):
    folder, result, _, _ = trt_artifacts
    assert result["version"] and result["device"]
    assert (folder / TIMING_CACHE).stat().st_size > 0
    for name, (inputs, outputs) in SPECS.items():
        entry = result["engines"][name]
        assert (folder / entry["file"]).stat().st_size == entry["bytes"] > 0
        assert [i["name"] for i in entry["inputs"]] == [s.name for s in inputs]
        assert [o["name"] for o in entry["outputs"]] == [s.name for s in outputs]
        assert entry["num_profiles"] == len(result["profiles"][name])
    cache = (folder / TIMING_CACHE).read_bytes()
    again = build_engines(
        folder,
        {"decode": read_manifest(folder)["graphs"]["decode"]},
        trt_artifacts[2],
        options_for(folder, **_limits(trt_artifacts[3])),
        lambda m: None,
    )
    assert again["built"] and len((folder / TIMING_CACHE).read_bytes()) >= len(cache)


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("name", list(GRAPHS))
def test_engine_switches_profiles_and_matches_onnxruntime(trt_artifacts, name):
    folder, _, config, manifest = trt_artifacts
    backend = trt_backend(trt_artifacts, name)
    ort = OnnxRuntimeBackend(folder / manifest["graphs"][name]["file"], *SPECS[name])
    used = set()
    for seed, point in enumerate(POINTS[name]):
        feed = random_feed(name, config, point, seed)
        out, ref = backend.infer(feed), ort.infer(feed)
        used.add(backend._active)
        for key in ref:
            assert out[key].shape == ref[key].shape
            assert rel_l2(out[key], ref[key]) < 1e-3, (point, key)
    assert len(used) >= 3


@pytest.mark.tensorrt
@needs_tensorrt
def test_device_tensors_in_device_tensors_out(trt_artifacts):
    _, _, config, _ = trt_artifacts
    backend = trt_backend(trt_artifacts, "decode")
    feed = random_feed("decode", config, {"batch": 2, "past_sequence": 30})
    on_gpu = {k: torch.from_numpy(v).cuda() for k, v in feed.items()}
    out = backend.infer(on_gpu)
    assert all(v.is_cuda for v in out.values())
    host = backend.infer(feed)
    for key, value in host.items():
        np.testing.assert_array_equal(out[key].cpu().numpy(), value)
    with pytest.raises(MllamaExportError, match="past_sequence 600 outside"):
        backend.infer(random_feed("decode", config, {"past_sequence": 600}))


@pytest.mark.tensorrt
@needs_tensorrt
def test_runner_on_engines_generates_what_onnxruntime_does(trt_artifacts, ort_artifacts):
    from conftest import random_images

    folder, result, config, manifest = trt_artifacts
    manifest = {**manifest, "tensorrt": result}
    backends = tensorrt_backends(folder, manifest, SPECS, "cuda")
    runner = Runner(config, *backends, Limits(**manifest["limits"]), manifest["io_dtype"])
    assert runner.store.zeros((1,), np.dtype(np.float32)).is_cuda  # caches on the GPU
    img = config.image_token_id
    prompts = [[500, img] + [20 + i % 400 for i in range(100)], [500, img, 30, 31]]
    images = random_images(config, [[6], [2]], seed=4)
    ours = runner.generate_ids(prompts, images, max_new_tokens=16, stop_tokens=set())
    ref = Runner.from_artifacts(ort_artifacts).generate_ids(
        prompts, images, max_new_tokens=16, stop_tokens=set()
    )
    assert ours.token_ids == ref.token_ids


@pytest.mark.tensorrt
@needs_tensorrt
def test_fp8_engine_against_onnxruntime_on_the_same_onnx(tiny_dir, tmp_path):
    from mllama_export.exporter.build import build
    from mllama_export.exporter.options import PRECISIONS

    if "fp8" not in PRECISIONS:
        pytest.skip("no fp8 artifacts: this version of the exporter has no fp8 precision")
    out = tmp_path / "fp8"
    build(BuildOptions(model=str(tiny_dir), out=out, precision="fp8"))
    manifest = read_manifest(out)
    config = config_of(manifest)
    result = build_engines(
        out, manifest["graphs"], config, options_for(out, "fp8", **_limits(manifest)), print
    )
    assert result["built"], result.get("reason")
    assert result["engines"]["decode"]["strongly_typed"]
    artifacts = (out, result, config, manifest)
    for name in GRAPHS:
        backend = trt_backend(artifacts, name)
        ort = OnnxRuntimeBackend(
            out / manifest["graphs"][name]["file"], *SPECS[name], optimization="basic"
        )
        for seed, point in enumerate(POINTS[name][:3]):
            feed = random_feed(name, config, point, seed)
            feed = {
                k: v.astype(_model_dtype(manifest)) if v.dtype == np.float32 else v
                for k, v in feed.items()
            }
            out_trt, ref = backend.infer(feed), ort.infer(feed)
            # FP8 engines: 16-bit rounding noise moves values across FP8 steps, so two runtimes
            # of the same Q/DQ graph differ by up to ~1e-1 (docs/accuracy.md); 16-bit by far less.
            limit = 0.15 if manifest["precision"] == "fp8" else 5e-2
            for key in ref:
                assert rel_l2(out_trt[key], ref[key]) < limit, (name, point, key)


def _model_dtype(manifest):
    from mllama_export.engines.runner import numpy_dtype

    return numpy_dtype(manifest["io_dtype"])
