"""`build --text-engine shared`: one TensorRT engine of the decode (step) graph serves prefill
and decode, built and run on the CPU stand-in for TensorRT 11 (tests/trt_standin.py), whose
engines run the very ONNX files in ONNX Runtime and refuse shapes outside the active profile.
The runner picks a prefill, decode or chunk profile at every bucket edge and generates what
ONNX Runtime generates; the artifacts need no prefill engine but keep the prefill graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import trt_standin as standin
from click.testing import CliRunner
from conftest import random_images

from mllama_export.cli import main
from mllama_export.engines.manifest_read import read_manifest, verify_files
from mllama_export.engines.profiles import ShapeProfile, graph_profiles
from mllama_export.engines.runner import Limits, Runner
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.options import BuildOptions

IMG = 512
SEQ = 300  # prefill buckets 1-64 | 65-128 | 129-256 | 257-300; past 2-256 | 257-300


def _stand_in(mp) -> list:
    return standin.install_trt11(mp)[1]


@pytest.fixture(scope="module")
def shared_build(tmp_path_factory, tiny_dir):
    """`mllama-export build --text-engine shared` through the stand-in, with the calls it made."""
    out = tmp_path_factory.mktemp("shared") / "tiny-shared"
    with pytest.MonkeyPatch.context() as mp:
        calls = _stand_in(mp)
        args = ["build", "--model", str(tiny_dir), "--out", str(out), "--xattn-mask", "hf"]
        result = CliRunner().invoke(main, [*args, "--max-seq-len", str(SEQ), "--text-engine", "shared"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, calls, result.output


@pytest.fixture
def trt_runtime(monkeypatch):
    _stand_in(monkeypatch)


def test_a_shared_build_has_one_text_engine_and_keeps_the_prefill_graph(shared_build):
    out, calls, output = shared_build
    manifest = read_manifest(out)
    verify_files(out, manifest)
    entry = manifest["tensorrt"]
    assert entry["built"] and entry["text_engine"] == "shared"
    assert manifest["build_options"]["text_engine"] == "shared"
    assert sorted(entry["engines"]) == ["decode", "vision"]
    assert sorted(p.name for p in (out / "engines").glob("*.engine")) == [
        "decode.engine",
        "vision.engine",
    ]
    # the prefill ONNX graph is still exported and checked (ONNX Runtime and the gate use it)
    assert (out / manifest["graphs"]["prefill"]["file"]).is_file()
    assert manifest["graphs"]["prefill"]["check"]
    networks = [a["path"] for n, a in calls if n == "NetworkFromOnnxPath"]
    assert [p.rsplit("/", 1)[-1] for p in networks] == ["vision.onnx", "decode.onnx"]
    config = Runner.from_artifacts(out).config
    expected = graph_profiles("decode", config, Limits(4, SEQ, 2), text_engine="shared")
    recorded = [ShapeProfile.from_json(p) for p in entry["profiles"]["decode"]]
    assert recorded == expected
    assert [p.phase for p in recorded] == ["prefill"] * 4 + ["decode"] * 6 + ["chunk"] * 2
    built = [a for n, a in calls if n == "CreateConfig"][1]["profiles"]
    assert [{k: tuple(v) for k, v in p.items()} for p in built] == [p.shapes for p in expected]
    script = (out / "engines" / "trtexec.sh").read_text()
    assert "--onnx=onnx/decode.onnx" in script and "--onnx=onnx/prefill.onnx" not in script
    assert "TensorRT engines built" in output


def test_engines_dir_knows_there_is_no_prefill_engine(shared_build, trt_runtime):
    out, _, _ = shared_build
    result = CliRunner().invoke(main, ["engines", str(out), "prefill"])
    assert result.exit_code == 2
    assert "unknown engine(s) prefill; expected some of vision, decode" in result.output
    assert "the decode engine serves prefill" in result.output


def _runs(backend) -> list[int]:
    return backend.engine.contexts[0].runs


def _phase(backend, index) -> str:
    return backend.profiles[index].phase


# (prompt length, new tokens): the prompt's bucket and the cache's (prompt + new) bucket
EDGES = [(64, 4), (65, 4), (128, 4), (129, 4), (250, 6), (250, 7), (257, 8), (290, 10)]


@pytest.mark.parametrize(("length", "new"), EDGES)
def test_the_runner_picks_the_right_profile_at_every_bucket_edge(
    shared_build, trt_runtime, ort_artifacts, length, new
):
    out, _, _ = shared_build
    trt = Runner.from_artifacts(out, backend="tensorrt")
    assert trt.prefill is None and trt.max_step_tokens() == SEQ
    prompts = [[500, IMG, *(20 + i % 400 for i in range(length - 2))], [500, IMG, 30, 31]]
    images = random_images(trt.config, [[6], [2]], seed=length)
    kw = dict(max_new_tokens=new, stop_tokens=set(), keep_logits=True)
    ours = trt.generate_ids(prompts, images, **kw)
    ref = Runner.from_artifacts(ort_artifacts).generate_ids(prompts, images, **kw)
    assert ours.token_ids == ref.token_ids
    real = ref.prompt_mask != 0
    err = np.linalg.norm(ours.prefill_logits[real] - ref.prefill_logits[real])
    assert err / np.linalg.norm(ref.prefill_logits[real]) < 1e-5
    step = trt.decode
    runs = _runs(step)
    prefill, steps = step.profiles[runs[0]], [step.profiles[i] for i in runs[1:]]
    assert prefill.phase == "prefill" and prefill.ranges["past_sequence"] == (1, 1, 1)
    lo, _, hi = prefill.ranges["new_tokens"]
    assert lo <= length <= hi
    cap = length + new
    assert len(steps) == new - 1
    for p in steps:
        assert p.phase == "decode" and p.ranges["batch"][0] <= 2 <= p.ranges["batch"][2]
        assert p.ranges["past_sequence"][0] <= cap <= p.ranges["past_sequence"][2]


def test_chunked_prefill_on_the_shared_engine_uses_its_chunk_profiles(
    shared_build, trt_runtime, ort_artifacts
):
    out, _, _ = shared_build
    trt = Runner.from_artifacts(out, backend="tensorrt")
    prompts = [[500, IMG, *(40 + i for i in range(27))]]  # 29 tokens: chunks 8, 8, 8, 5
    images = random_images(trt.config, [[3]], seed=1)
    kw = dict(max_new_tokens=5, stop_tokens=set(), prefill_chunk=8)
    ours = trt.generate_ids(prompts, images, **kw)
    assert (
        ours.token_ids
        == Runner.from_artifacts(ort_artifacts).generate_ids(prompts, images, **kw).token_ids
    )
    phases = [_phase(trt.decode, i) for i in _runs(trt.decode)]
    assert phases == ["chunk"] * 4 + ["decode"] * 4
    ones = trt.generate_ids(prompts, images, **{**kw, "prefill_chunk": 1})
    assert ones.token_ids == ours.token_ids  # chunks of one token run in the decode profiles
    with pytest.raises(MllamaExportError, match=f"at most {SEQ} new token"):
        trt.generate_ids(prompts, images, **{**kw, "prefill_chunk": SEQ + 1})


def test_a_split_decode_engine_refuses_longer_chunks_in_one_line(
    shared_build, trt_runtime, tmp_path
):
    """A split build's decode engine takes one new token per call (its profiles say so)."""
    from mllama_export.engines.profiles import all_profiles

    out, _, _ = shared_build
    manifest = read_manifest(out)
    profiles = all_profiles(Runner.from_artifacts(out).config, Limits(4, SEQ, 2))["decode"]
    path = standin.write_engine(tmp_path, "decode", out / "onnx" / "decode.onnx", profiles)
    from mllama_export.graphs.model import DecodeGraph

    decode = standin.CpuTensorRTBackend(path, DecodeGraph.INPUTS, DecodeGraph.OUTPUTS, profiles)
    assert decode.max_step_tokens == 1
    runner = Runner.from_artifacts(out)
    runner.decode = decode
    with pytest.raises(MllamaExportError) as err:
        runner.generate_ids([[500, 1, 2, 3]], None, 3, prefill_chunk=2)
    assert "a split decode engine takes one: rebuild with --text-engine shared" in str(err.value)
    assert "\n" not in str(err.value) and manifest["tensorrt"]["text_engine"] == "shared"
    chunked = runner.generate_ids([[500, 1, 2, 3]], None, 3, prefill_chunk=1, stop_tokens=set())
    plain = Runner.from_artifacts(out).generate_ids([[500, 1, 2, 3]], None, 3, stop_tokens=set())
    assert chunked.token_ids == plain.token_ids


def test_shared_artifacts_run_on_onnxruntime_with_the_prefill_graph(shared_build):
    out, _, _ = shared_build
    runner = Runner.from_artifacts(out)
    assert runner.prefill is not None  # ONNX Runtime runs the prefill graph as ever
    ran = CliRunner().invoke(
        main, ["run", str(out), "--token-ids", "500,20,21", "--max-new-tokens", "3", "--json"]
    )
    assert ran.exit_code == 0 and len(json.loads(ran.output)["token_ids"]) == 3


def test_text_engine_is_a_checked_build_option(tmp_path):
    from mllama_export.graphs.config import preset

    with pytest.raises(MllamaExportError, match="text-engine 'one' \\(available: split, shared\\)"):
        BuildOptions(model="tiny", out=tmp_path / "x", text_engine="one").check(preset("tiny"))
    shown = CliRunner().invoke(main, ["build", "--help"])
    assert "--text-engine [split|shared]" in shown.output


# -- a real shared engine (TensorRT and a GPU) ------------------------------------------------


def _tensorrt_here() -> str | None:
    import importlib.util

    import torch

    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU is visible"


@pytest.mark.tensorrt
@pytest.mark.skipif(_tensorrt_here() is not None, reason=f"needs TensorRT: {_tensorrt_here()}")
def test_real_shared_engine_generates_what_onnxruntime_does(tiny_dir, tmp_path_factory):
    from mllama_export.exporter.build import build

    out = tmp_path_factory.mktemp("trt-shared") / "tiny-shared"
    options = BuildOptions(
        model=str(tiny_dir), out=out, xattn_mask="hf", max_seq_len=SEQ, text_engine="shared",
        engines="require",
    )  # fmt: skip
    build(options)
    trt = Runner.from_artifacts(out, backend="tensorrt", device="cuda")
    ort = Runner.from_artifacts(out)
    assert trt.prefill is None and trt.max_step_tokens() == SEQ
    used = set()
    for length, new in EDGES:
        prompts = [[500, IMG, *(20 + i % 400 for i in range(length - 2))], [500, IMG, 30, 31]]
        images = random_images(trt.config, [[6], [2]], seed=length)
        for chunk in (None, 8):
            kw = dict(max_new_tokens=new, stop_tokens=set(), prefill_chunk=chunk)
            ours = trt.generate_ids(prompts, images, **kw)
            assert ours.token_ids == ort.generate_ids(prompts, images, **kw).token_ids
        used |= {trt.decode.profiles[i].phase for i in trt.decode._chosen.values()}
    assert used == {"prefill", "decode", "chunk"}
