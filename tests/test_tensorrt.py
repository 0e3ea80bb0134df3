"""TensorRT engines: trtexec.sh, the engine stage and the backend against a CPU stand-in for
TensorRT 11 (tests/trt_standin.py), and, where TensorRT and a GPU exist, real engines of
every precision against ONNX Runtime on the same ONNX files. Every check the marked tests
make runs here too, on the stand-in, through the same helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trt_standin as standin
from click.testing import CliRunner

from mllama_export.cli import main
from mllama_export.engines import tensorrt as trt_module
from mllama_export.engines.manifest_read import read_manifest, verify_files
from mllama_export.engines.onnxrt import OnnxRuntimeBackend
from mllama_export.engines.profiles import ShapeProfile, all_profiles, graph_profiles
from mllama_export.engines.runner import Limits, Runner
from mllama_export.engines.tensorrt import TensorRTBackend, tensorrt_backends
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.build import build, rebuild_engines
from mllama_export.exporter.engine_stage import (
    TIMING_CACHE,
    TRTEXEC_SCRIPT,
    _reuse_timing_cache,
    plan_engines,
    prepare_engines,
)
from mllama_export.exporter.onnx_export import example_inputs
from mllama_export.exporter.options import BuildOptions
from mllama_export.exporter.tensorrt_build import summarize_layers
from mllama_export.graphs.config import MllamaConfig, preset
from mllama_export.graphs.model import DecodeGraph, PrefillGraph, VisionGraph

GRAPHS = {"vision": VisionGraph, "prefill": PrefillGraph, "decode": DecodeGraph}
SPECS = {name: (cls.INPUTS, cls.OUTPUTS) for name, cls in GRAPHS.items()}
TINY = preset("tiny")
ONNX = {name: {"file": f"onnx/{name}.onnx"} for name in GRAPHS}
PRECISION_FLAGS = ("--fp16", "--bf16", "--fp8", "--int8", "--best")


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


@pytest.fixture
def no_tensorrt(monkeypatch):
    """As on a machine without TensorRT, even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def trt11(monkeypatch):
    """TensorRT 11 stood in on the CPU: the module, a GPU of compute capability 9.0, and
    Polygraphy's loaders as TensorRT 11 would make them behave. Yields a controller:
    `.failures[graph] = message` makes that engine fail with TensorRT's message."""
    failures: dict[str, str] = {}
    fake, calls = standin.install_trt11(monkeypatch, failures)
    controller = type("TRT11", (), {})()
    controller.trt, controller.failures, controller.calls = fake, failures, calls
    return controller


def options_for(out: Path, precision="fp32", batch=4, seq=512, images=2) -> BuildOptions:
    return BuildOptions(
        model="tiny", out=out, precision=precision, max_batch=batch, max_seq_len=seq,
        max_images=images,
    )  # fmt: skip


def config_of(manifest) -> MllamaConfig:
    return MllamaConfig.from_hf_dict(manifest["model"]["config"])


# ------------------------------------------------------------ trtexec.sh without TensorRT


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
    """Runs engines/trtexec.sh with a stand-in trtexec that records its argv and cwd and
    writes the engine file it is asked for (trtexec 11 exits on --fp16/--bf16: so does it)."""
    log = tmp_path / "trtexec.log"
    log.unlink(missing_ok=True)
    fake = tmp_path / "fake-trtexec"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "with open(os.environ['FAKE_LOG'], 'a') as f:\n"
        "    f.write(json.dumps({'cwd': os.getcwd(), 'args': sys.argv[1:]}) + '\\n')\n"
        f"if set(sys.argv) & {set(PRECISION_FLAGS)!r}:\n"
        "    sys.exit('trtexec 11: unknown option')\n"
        "for a in sys.argv:\n"
        "    if a.startswith('--saveEngine='):\n"
        "        open(a.split('=', 1)[1], 'wb').write(b'engine')\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "TRTEXEC": str(fake), "FAKE_LOG": str(log), "TRTEXEC_FLAGS": flags}
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
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "fp8"])
def test_trtexec_sh_is_strongly_typed_without_precision_flags(
    no_tensorrt, tmp_path, precision, caplog
):
    folder = tmp_path / "art"
    folder.mkdir()
    options = options_for(folder, precision, batch=3, seq=300, images=2)
    graphs = {**ONNX}
    if precision == "fp8":  # as an fp8 build records them: FP8 text graphs, fp16 vision
        graphs = {
            n: {**g, "precision": "fp16" if n == "vision" else "fp8"} for n, g in ONNX.items()
        }
    with caplog.at_level("INFO", logger="mllama_export"):
        entry = prepare_engines(folder, graphs, TINY, options)
    messages = [r.getMessage() for r in caplog.records]
    assert entry["status"] == "unavailable" and entry["built"] is False
    assert entry["reason"].startswith("TensorRT is not installed")
    assert "\n" not in entry["reason"] and f"mllama-export engines {folder}" in entry["reason"]
    assert messages == [f"no TensorRT engines built: {entry['reason']}"]
    assert {e["status"] for e in entry["engines"].values()} == {"pending"}
    assert sorted(p.name for p in (folder / "engines").iterdir()) == ["trtexec.sh"]
    json.dumps(entry)  # goes into manifest.json as it is

    expected = all_profiles(TINY, options)
    assert entry["profiles"] == {g: [p.to_json() for p in ps] for g, ps in expected.items()}
    script = (folder / TRTEXEC_SCRIPT).read_text()
    assert not any(flag in script for flag in PRECISION_FLAGS) and "weakly" not in script
    calls = run_script(folder, tmp_path)
    assert [Path(c["cwd"]).resolve() for c in calls] == [folder.resolve()] * 3
    for call, graph in zip(calls, ("vision", "prefill", "decode"), strict=True):
        args = call["args"]
        assert f"--onnx=onnx/{graph}.onnx" in args and "--stronglyTyped" in args
        assert f"--saveEngine=engines/{graph}.engine.partial" in args
        assert f"--timingCacheFile={TIMING_CACHE}" in args
        assert "--noTF32" in args and "--skipInference" in args
        assert not set(args) & set(PRECISION_FLAGS)
        parsed = parse_profiles(args)
        assert parsed == [p.shapes for p in expected[graph]]
        assert parsed == [ShapeProfile.from_json(p).shapes for p in entry["profiles"][graph]]
    # each engine written as .partial, renamed when trtexec succeeded
    assert sorted(p.name for p in (folder / "engines").iterdir()) == [
        "decode.engine", "prefill.engine", "trtexec.sh", "vision.engine",
    ]  # fmt: skip


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
def test_trtexec_sh_builds_one_graph_with_extra_flags(no_tensorrt, tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    prepare_engines(folder, ONNX, TINY, options_for(folder, "bf16"))
    (call,) = run_script(folder, tmp_path, "decode", flags="--verbose")
    args = call["args"]
    assert args[0] == "--verbose" and "--onnx=onnx/decode.onnx" in args
    assert "--stronglyTyped" in args and not set(args) & set(PRECISION_FLAGS)
    assert len(parse_profiles(args)) == len(all_profiles(TINY, options_for(folder))["decode"])
    assert sorted(p.name for p in (folder / "engines").iterdir()) == ["decode.engine", "trtexec.sh"]


def test_unknown_precision_and_graph_are_refused(tmp_path):
    profiles = all_profiles(TINY, options_for(tmp_path))
    with pytest.raises(MllamaExportError, match="precision 'int4'"):
        plan_engines(ONNX, profiles, "int4")
    with pytest.raises(MllamaExportError, match="graph named 'text'"):
        plan_engines({"text": {"file": "x.onnx"}}, profiles, "fp32")


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


# --------------------------------------------------- the stand-in refuses what TensorRT 11 does


def test_the_stand_in_refuses_what_tensorrt_11_refuses(trt11, tmp_path, ort_artifacts):
    """Not vacuous: a weakly typed network, the FP16/BF16 builder flags, a whole-file read, a
    non-user-managed context, the default stream, tensors over 2^31-1 elements all fail."""
    import polygraphy.backend.trt as ptrt

    onnx = ort_artifacts / "onnx" / "decode.onnx"
    with pytest.raises(standin.PolygraphyError, match="weakly typed"):
        ptrt.NetworkFromOnnxPath(str(onnx))
    for flag in ("fp16", "bf16"):
        with pytest.raises(standin.PolygraphyError, match=f"{flag} in CreateConfig is not"):
            ptrt.CreateConfig(**{flag: True})
    profiles = graph_profiles("decode", TINY, Limits(4, 512, 2))
    path = standin.write_engine(tmp_path, "decode", onnx, profiles)
    runtime = trt11.trt.Runtime(None)
    with pytest.raises(TypeError, match="not a whole file in memory"):
        runtime.deserialize_cuda_engine(path.read_bytes())
    engine = trt_module.deserialize_engine(trt11.trt, runtime, path)
    with pytest.raises(RuntimeError, match="user-managed"):
        engine.create_execution_context()
    context = engine.create_execution_context("USER_MANAGED")
    with pytest.raises(RuntimeError, match="default stream"):
        context.set_optimization_profile_async(0, 0)
    with pytest.raises(RuntimeError, match="default stream"):
        context.execute_async_v3(0)
    with pytest.raises(RuntimeError, match="without 5000 bytes"):
        context.execute_async_v3(77)
    # 4 x 2^27 cache slots: past_key [2, 4, 2, 2^27, 16] is 2^34 elements
    sizes = {**_sizes(), "past_sequence": 2**27, "total_sequence": 2**27 + 1}
    huge = {s.name: s.shape(sizes) for s in DecodeGraph.INPUTS}
    assert "past_key" in {name for name, _ in standin.over_cap(onnx, huge)}


def _sizes() -> dict:
    from mllama_export.graphs.contract import static_dims

    per_image = TINY.vision.max_num_tiles * TINY.vision.num_patches
    return {
        **static_dims(TINY),
        "batch": 4,
        "num_images": 2,
        "image_tokens": 2 * per_image,
        "new_tokens": 1,
        "num_logits": 1,
    }


# ------------------------------------------------------------- the engine stage, stood in


def copy_as(folder: Path, tmp_path: Path, precision: str | None = None) -> Path:
    """A copy of an artifact folder; `precision` rewrites what the manifest says its graphs
    are (the engine stage's calls into Polygraphy depend on nothing else)."""
    out = tmp_path / f"art-{precision or 'copy'}"
    shutil.copytree(folder, out)
    if precision is not None:
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["precision"] = precision
        for graph in manifest["graphs"].values():
            graph["precision"] = precision
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "fp8"])
def test_every_precision_builds_strongly_typed_engines(
    trt11, tmp_path, ort_artifacts, fp8_dir, precision
):
    source = fp8_dir if precision == "fp8" else ort_artifacts
    folder = copy_as(source, tmp_path, None if precision == "fp8" else precision)
    before = {k: v for k, v in read_manifest(folder)["files"].items() if k.startswith("onnx/")}
    entry = rebuild_engines(folder)
    assert entry["built"] and entry["status"] == "built" and "reason" not in entry
    assert entry["version"] == standin.VERSION and entry["device"] == "Stand-in H100"
    assert entry["compute_capability"] == "9.0"
    networks = [a for n, a in trt11.calls if n == "NetworkFromOnnxPath"]
    configs = [a for n, a in trt11.calls if n == "CreateConfig"]
    assert [Path(a["path"]).name for a in networks] == [
        "vision.onnx",
        "prefill.onnx",
        "decode.onnx",
    ]
    assert all(a["strongly_typed"] is True for a in networks)
    assert all(not a.get(f) for a in configs for f in ("fp16", "bf16", "int8", "fp8"))
    manifest = read_manifest(folder)
    for name in GRAPHS:
        engine = manifest["tensorrt"]["engines"][name]
        assert engine["status"] == "built" and engine["strongly_typed"] is True
        assert (folder / engine["file"]).stat().st_size == engine["bytes"] > 0
        assert [i["name"] for i in engine["inputs"]] == [s.name for s in SPECS[name][0]]
        got = [
            {n: tuple(t) for n, t in p.items()}
            for p in configs[list(GRAPHS).index(name)]["profiles"]
        ]
        assert got == [
            ShapeProfile.from_json(p).shapes for p in manifest["tensorrt"]["profiles"][name]
        ]
    assert (folder / TIMING_CACHE).read_bytes() == b"+timings" * 3
    assert not (folder / f"{TIMING_CACHE}.lock").exists()
    assert not list((folder / "engines").glob("*.partial*"))
    verify_files(folder, manifest)  # the engines are hashed like every other file
    assert {k: v for k, v in manifest["files"].items() if k.startswith("onnx/")} == before
    if precision == "fp8":
        check_fp8_layers(manifest)
        shown = CliRunner().invoke(main, ["inspect", str(folder)])
        assert shown.exit_code == 0 and "fp8 layers" in shown.output
        assert "decode 38 of 59 GEMM layers run in FP8 (38 layers quantized)" in shown.output


def check_fp8_layers(manifest: dict) -> None:
    """What the engine inspector said of each FP8 engine at build time: its quantized
    layers' GEMMs take FP8 inputs. The same check for the stand-in and for TensorRT."""
    fp8 = [n for n, g in manifest["graphs"].items() if g.get("precision") == "fp8"]
    assert fp8, "no FP8 graph in these artifacts"
    for name in fp8:
        check = manifest["tensorrt"]["engines"][name]["fp8_layers"]
        quantized = len(manifest["graphs"][name]["quantized_layers"])
        assert check["ok"] and check["quantized_layers"] == quantized > 0, (name, check)
        assert check["fp8_gemm_layers"] >= quantized / 2, (name, check)
        assert check["gemm_layers"] >= check["fp8_gemm_layers"]


def test_layer_information_is_read_as_tensorrt_writes_it():
    myelin = {
        "Layers": [
            {
                "Name": "q_proj",
                "LayerType": "gemm",
                "Inputs": [{"Format/Datatype": "Row major linear FP8"}],
            },
            {"Name": "scores", "LayerType": "gemm", "Inputs": [{"Format/Datatype": "Half"}]},
            {
                "Name": "fc",
                "LayerType": "CaskGemmMatrixMultiply",
                "Inputs": [],
                "TacticName": "sm90_xmma_gemm_e4m3e4m3_f32",
            },
            {"Name": "norm", "LayerType": "Reduce", "Inputs": [{"Format/Datatype": "FP8"}]},
        ]
    }
    got = summarize_layers(json.dumps(myelin), quantized_layers=2)
    assert got == {
        "gemm_layers": 3, "fp8_gemm_layers": 2, "quantized_layers": 2,
        "non_fp8_gemms": ["scores"], "ok": True,
    }  # fmt: skip
    names_only = {"Layers": ["q_proj", "scores"]}  # without detailed profiling verbosity
    assert summarize_layers(json.dumps(names_only), 2)["ok"] is False
    with pytest.raises(MllamaExportError, match="no JSON"):
        summarize_layers("Layers: q_proj", 2)


def test_an_engine_over_the_tensor_cap_fails_with_tensorrts_message(trt11, tmp_path, ort_artifacts):
    """Should a profile slip past the check before work, TensorRT's refusal is recorded."""
    folder = copy_as(ort_artifacts, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    huge = [p.to_json() for p in graph_profiles("decode", TINY, Limits(4, 2**27, 2))[-1:]]
    huge[0]["index"] = 0
    manifest["tensorrt"]["profiles"]["decode"] = huge
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MllamaExportError, match="the decode TensorRT engine failed") as err:
        rebuild_engines(folder, ["decode"])
    assert "tensor volume exceeds 2147483647" in str(err.value) and "\n" not in str(err.value)
    engine = read_manifest(folder)["tensorrt"]["engines"]["decode"]
    assert engine["status"] == "failed" and "134217728" in engine["error"]  # 2^27 slots
    assert (folder / engine["log"]).is_file() and not (folder / "engines/decode.engine").exists()


# ------------------------------------------ the backend's mechanics on stand-in engines


@pytest.fixture(scope="module")
def stand_in(ort_artifacts, tmp_path_factory):
    """Stand-in engine files for the tiny artifacts: the ONNX file and the profiles."""
    manifest = read_manifest(ort_artifacts)
    limits = Limits(**manifest["limits"])
    profiles = all_profiles(config_of(manifest), limits)
    folder = tmp_path_factory.mktemp("stand-in")
    for name in GRAPHS:
        onnx = ort_artifacts / manifest["graphs"][name]["file"]
        standin.write_engine(folder, name, onnx, profiles[name])
    return folder, profiles, manifest


@pytest.fixture
def fake_trt(monkeypatch):
    fake = standin.fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def cpu_backend(stand_in, name, **kw) -> standin.CpuTensorRTBackend:
    folder, profiles, _ = stand_in
    return standin.CpuTensorRTBackend(folder / f"{name}.engine", *SPECS[name], profiles[name], **kw)


def random_feed(name, config, sizes, seed=0) -> dict[str, np.ndarray]:
    inputs = SPECS[name][0]
    full = {"batch": 1, "num_images": 1, "sequence": 1, "num_logits": 1, "past_sequence": 1}
    args = example_inputs(inputs, config, torch.float32, {**full, **sizes}, seed=seed)
    return {s.name: a.numpy() for s, a in zip(inputs, args, strict=True)}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# one call per profile region, on both sides of every bucket edge of the tiny defaults
# (batch 1 | 2 | 3-4, images 1 | 2, prompt 1-64 | 65-128 | 129-256 | 257-512, past 1-256 |
# 257-512), in an order that switches profile at almost every call
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
        {"batch": 1, "sequence": 64, "num_logits": 64},
        {"batch": 2, "sequence": 65, "num_images": 2},
        {"batch": 1, "sequence": 128},
        {"batch": 1, "sequence": 129, "num_logits": 3},
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


def profile_of(profiles, point) -> int:
    return next(
        i
        for i, p in enumerate(profiles)
        if all(p.ranges[d][0] <= v <= p.ranges[d][2] for d, v in point.items() if d in p.ranges)
    )


def engine_against(backend, reference, name, config, limit, cast=None) -> list[int]:
    """Runs POINTS[name] through both; every output within `limit` (relative L2); returns
    the profile each call ran in. The stand-in and the real engines share this check."""
    used = []
    for seed, point in enumerate(POINTS[name]):
        feed = random_feed(name, config, point, seed)
        if cast is not None:
            feed = {k: v.astype(cast) if v.dtype == np.float32 else v for k, v in feed.items()}
        out, ref = backend.infer(feed), reference.infer(feed)
        for key in ref:
            assert isinstance(out[key], np.ndarray)
            assert out[key].shape == ref[key].shape, (name, point, key)
            assert rel_l2(out[key], ref[key]) < limit, (name, point, key)
            assert np.isfinite(np.asarray(out[key], np.float32)).all(), (name, point, key)
        used.append(backend._active)
        assert used[-1] == profile_of(backend.profiles, point), point
    return used


@pytest.mark.parametrize("name", list(GRAPHS))
def test_stand_in_engine_switches_profiles_at_bucket_edges_and_matches_onnxruntime(
    fake_trt, stand_in, name
):
    folder, profiles, manifest = stand_in
    config = config_of(manifest)
    backend = cpu_backend(stand_in, name)
    onnx = json.loads((folder / f"{name}.engine").read_bytes()[len(standin.MAGIC) + 8 :])["onnx"]
    ort = OnnxRuntimeBackend(Path(onnx), *SPECS[name])
    used = engine_against(backend, ort, name, config, 1e-6)
    context = backend.engine.contexts[0]
    switches = [u for i, u in enumerate(used) if i == 0 or used[i - 1] != u]
    assert context.switches == switches and len(set(switches)) >= 3
    assert context.runs == used
    # every call ran on the backend's own stream, after the caller's (default) stream
    assert context.streams == {backend._stream.cuda_stream} != {0}
    assert backend._stream.waited and all(
        s is standin.DEFAULT_STREAM for s in backend._stream.waited
    )
    # the same shapes again: no switch, and the choice is remembered
    backend.infer(random_feed(name, config, POINTS[name][-1]))
    assert context.switches == switches


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
    prefill = cpu_backend(stand_in, "prefill")
    with pytest.raises(MllamaExportError, match="num_logits 65 is more than sequence 64"):
        prefill.infer(random_feed("prefill", config, {"sequence": 64, "num_logits": 65}))


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
        standin.CpuTensorRTBackend(
            folder / "decode.engine", *SPECS["decode"], profiles["decode"][:2]
        )
    with pytest.raises(MllamaExportError, match="the backend expects inputs"):
        standin.CpuTensorRTBackend(folder / "decode.engine", *SPECS["prefill"], profiles["decode"])
    shifted = list(profiles["vision"])
    shifted[0], shifted[1] = shifted[1], shifted[0]
    with pytest.raises(MllamaExportError, match="profile 0 of pixel_values is"):
        standin.CpuTensorRTBackend(folder / "vision.engine", *SPECS["vision"], shifted)
    (folder / "junk.engine").write_bytes(b"not an engine")
    with pytest.raises(MllamaExportError, match="cannot deserialize"):
        standin.CpuTensorRTBackend(folder / "junk.engine", *SPECS["vision"], profiles["vision"])


def test_engines_are_read_through_a_stream_reader_in_chunks(fake_trt, stand_in, monkeypatch):
    monkeypatch.setattr(trt_module, "READ_CHUNK", 1000)
    backend = cpu_backend(stand_in, "prefill")
    size = (stand_in[0] / "prefill.engine").stat().st_size
    reads = fake_trt.Runtime(None).reads
    assert sum(reads) == size and max(reads) <= 1000 and len(reads) > 2
    assert backend.engine.num_optimization_profiles == len(stand_in[1]["prefill"])


def test_the_default_stream_is_refused(fake_trt, stand_in):
    with pytest.raises(MllamaExportError, match="given the default CUDA stream"):
        cpu_backend(stand_in, "decode", stream=standin.FakeStream(0))


def test_three_engines_share_one_scratch_buffer_and_one_stream(fake_trt, stand_in, monkeypatch):
    folder, profiles, manifest = stand_in
    monkeypatch.setattr(trt_module, "TensorRTBackend", standin.CpuTensorRTBackend)
    entry = {
        "built": True,
        "engines": {n: {"file": f"{n}.engine"} for n in GRAPHS},
        "profiles": {n: [p.to_json() for p in ps] for n, ps in profiles.items()},
    }
    backends = tensorrt_backends(folder, {"tensorrt": entry}, SPECS, device_outputs=True)
    assert len({id(b._scratch) for b in backends}) == 1
    assert len({b._stream.cuda_stream for b in backends}) == 1
    scratch = backends[0]._scratch
    assert scratch.size == max(standin.SCRATCH.values())  # the largest, not the sum
    runner = Runner(
        config_of(manifest),
        dict(zip(GRAPHS, backends, strict=True)),
        Limits(**manifest["limits"]),
        manifest["io_dtype"],
    )
    runner.generate_ids([[500, 20, 21]], max_new_tokens=3, stop_tokens=set())
    memories = {b.engine.contexts[0].memory for b in backends[1:]}  # vision: no image given
    assert memories == {(scratch.buffer.data_ptr(), scratch.size)}


def test_backend_without_tensorrt_is_one_clear_line(no_tensorrt, tmp_path):
    with pytest.raises(MllamaExportError) as err:
        TensorRTBackend(tmp_path / "x.engine", *SPECS["decode"], [])
    assert "needs TensorRT and a CUDA GPU" in str(err.value) and "\n" not in str(err.value)
    manifest = {"tensorrt": {"built": False, "reason": "TensorRT is not installed"}}
    with pytest.raises(MllamaExportError, match="has no TensorRT engines: TensorRT is not"):
        tensorrt_backends(tmp_path, manifest, SPECS)


def test_runner_on_stand_in_engines_generates_what_onnxruntime_does(
    fake_trt, stand_in, ort_artifacts
):
    from conftest import random_images

    _, _, manifest = stand_in
    config = config_of(manifest)
    backends = [cpu_backend(stand_in, name, device_outputs=True) for name in GRAPHS]
    trt_runner = Runner(
        config, dict(zip(GRAPHS, backends, strict=True)), Limits(**manifest["limits"]),
        manifest["io_dtype"],
    )  # fmt: skip
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
    assert ours.prefill_logits.shape == (2, 252, config.text.vocab_size)  # every position
    for a, b in zip(ours.step_logits, ref.step_logits, strict=True):
        assert rel_l2(a, b) < 1e-5
    # one profile per stage: prompt 129..256 (prefill 2); batch 2, past 257..512 (decode 3)
    assert backends[1].engine.contexts[0].switches == [2]
    assert backends[2].engine.contexts[0].switches == [3]
    assert backends[2].engine.contexts[0].runs == [3] * 11


# --------------------------------------------------- real engines (TensorRT and a GPU)


@pytest.fixture(scope="module", params=["fp32", "fp16", "bf16", "fp8"])
def trt_built(request, tiny_dir, tmp_path_factory):
    """Each precision's tiny artifacts with their engines, built once per module."""
    if NO_TENSORRT is not None:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {NO_TENSORRT}")
    precision = request.param
    out = tmp_path_factory.mktemp("trt") / f"tiny-{precision}"
    options = BuildOptions(model=str(tiny_dir), out=out, precision=precision, engines="require")
    build(options)
    return out, read_manifest(out), precision


def _reference(folder: Path, manifest: dict, name: str):
    """The same ONNX file on the CPU: ONNX Runtime, or ONNX's reference for bf16."""
    path = folder / manifest["graphs"][name]["file"]
    if manifest["io_dtype"] == "bfloat16":
        from mllama_export.engines.onnxref import OnnxReferenceBackend

        return OnnxReferenceBackend(path, *SPECS[name])
    optimization = manifest.get("onnxruntime", {}).get("graph_optimization", "all")
    return OnnxRuntimeBackend(path, *SPECS[name], optimization=optimization)


# two runtimes of the same graph: fp32 rounds differently, 16-bit by op, FP8 by a step now and
# then (docs/accuracy.md)
ENGINE_LIMITS = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 8e-2, "fp8": 0.15}


@pytest.mark.tensorrt
@needs_tensorrt
def test_real_engines_build_strongly_typed(trt_built):
    folder, manifest, precision = trt_built
    entry = manifest["tensorrt"]
    assert entry["built"] and entry["version"] and entry["device"]
    assert (folder / TIMING_CACHE).stat().st_size > 0
    for name, (inputs, outputs) in SPECS.items():
        engine = entry["engines"][name]
        assert engine["status"] == "built" and engine["strongly_typed"]
        assert (folder / engine["file"]).stat().st_size == engine["bytes"] > 0
        assert [i["name"] for i in engine["inputs"]] == [s.name for s in inputs]
        assert [o["name"] for o in engine["outputs"]] == [s.name for s in outputs]
    verify_files(folder, manifest)


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("name", list(GRAPHS))
def test_real_engine_switches_profiles_at_bucket_edges_against_the_same_onnx(trt_built, name):
    from mllama_export.engines.store import numpy_dtype

    folder, manifest, precision = trt_built
    entry = manifest["tensorrt"]
    profiles = [ShapeProfile.from_json(p) for p in entry["profiles"][name]]
    backend = TensorRTBackend(folder / entry["engines"][name]["file"], *SPECS[name], profiles)
    cast = None if manifest["io_dtype"] == "float32" else numpy_dtype(manifest["io_dtype"])
    used = engine_against(
        backend, _reference(folder, manifest, name), name, config_of(manifest),
        ENGINE_LIMITS[precision], cast,
    )  # fmt: skip
    assert len(set(used)) >= 3


@pytest.mark.tensorrt
@needs_tensorrt
def test_real_fp8_engines_run_fp8_gemms(trt_built):
    folder, manifest, precision = trt_built
    if precision != "fp8":
        pytest.skip("the FP8 layer check is for fp8 artifacts")
    check_fp8_layers(manifest)
    shown = CliRunner().invoke(main, ["inspect", str(folder)])
    assert shown.exit_code == 0 and "GEMM layers run in FP8" in shown.output


@pytest.mark.tensorrt
@needs_tensorrt
def test_runner_on_real_engines_generates_what_onnxruntime_does(trt_built):
    from conftest import random_images

    folder, manifest, precision = trt_built
    if precision != "fp32":
        pytest.skip("token agreement is asked of fp32 only")
    runner = Runner.from_artifacts(folder, backend="tensorrt", device="cuda")
    assert runner.store.zeros((1,), np.dtype(np.float32)).is_cuda  # caches on the GPU
    config = config_of(manifest)
    img = config.image_token_id
    prompts = [[500, img] + [20 + i % 400 for i in range(100)], [500, img, 30, 31]]
    images = random_images(config, [[6], [2]], seed=4)
    ours = runner.generate_ids(prompts, images, max_new_tokens=16, stop_tokens=set())
    ref = Runner.from_artifacts(folder).generate_ids(
        prompts, images, max_new_tokens=16, stop_tokens=set()
    )
    assert ours.token_ids == ref.token_ids
    with pytest.raises(MllamaExportError, match="past_sequence 600 outside"):
        runner.decode.infer(random_feed("decode", config, {"past_sequence": 600}))
