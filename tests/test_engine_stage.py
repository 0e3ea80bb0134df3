"""Engines are a stage of their own: the ONNX artifacts are committed first, a failed engine
costs only itself, `mllama-export engines DIR` retries, --engines auto|skip|require."""

from __future__ import annotations

import json
import sys

import pytest
import trt_standin as standin
from click.testing import CliRunner

from mllama_export.cli import main
from mllama_export.engines.manifest_read import read_manifest, sha256, verify_files
from mllama_export.exporter import engine_stage

TRT_ERROR = (
    "[TRT] 2: [myelinBuilderUtils.cpp::operator()::371] Error Code 2: Internal Error (stand-in)"
)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def trt11(monkeypatch):
    """TensorRT 11 on a Hopper GPU, stood in on the CPU (tests/trt_standin.py)."""
    failures: dict[str, str] = {}
    _, calls = standin.install_trt11(monkeypatch, failures)
    return failures, calls


def test_a_failed_engine_keeps_the_onnx_and_engines_builds_only_the_engines(trt11, tmp_path):
    failures, calls = trt11
    failures["prefill"] = TRT_ERROR
    out = tmp_path / "art"
    line = one_line_error(invoke("build", "--model", "tiny", "--out", out, "--max-seq-len", 64))
    assert "the prefill TensorRT engine failed: [TRT] 2:" in line and "Error Code 2" in line
    assert f"retry with `mllama-export engines {out}`" in line
    # the ONNX artifacts, the manifest and trtexec.sh are there, and complete
    manifest = read_manifest(out)
    verify_files(out, manifest)
    for name in ("vision", "prefill", "decode"):
        assert (out / manifest["graphs"][name]["file"]).is_file()
    assert (out / "engines" / "trtexec.sh").is_file()
    entry = manifest["tensorrt"]
    assert entry["status"] == "failed" and entry["built"] is False
    assert entry["engines"]["vision"]["status"] == "built"  # built before the failure
    failed = entry["engines"]["prefill"]
    assert failed["status"] == "failed" and failed["error"] == TRT_ERROR
    assert TRT_ERROR in (out / failed["log"]).read_text()
    assert entry["engines"]["decode"]["status"] == "pending"
    assert not (out / "engines" / "prefill.engine").exists()
    assert not list((out / "engines").glob("*.partial*"))
    assert "mllama-export engines" in entry["reason"] and "prefill" in entry["reason"]
    shown = invoke("inspect", out)
    assert shown.exit_code == 0 and "FAILED: [TRT] 2:" in shown.output
    # run and validate work on ONNX Runtime
    ran = invoke("run", out, "--token-ids", "500,20,21", "--max-new-tokens", 3, "--json")
    assert ran.exit_code == 0, ran.output
    assert len(json.loads(ran.output)["token_ids"]) == 3
    gated = invoke("validate", out, "--steps", 1, "--report", tmp_path / "drift")
    assert gated.exit_code == 0, gated.output
    assert gated.output.strip().splitlines()[-1].startswith("PASS")
    refused = invoke("run", out, "--token-ids", "500,20", "--backend", "tensorrt")
    assert "the prefill engine failed" in one_line_error(refused)

    # the retry builds the engines only: the vision engine is kept, the ONNX is untouched
    onnx = {
        f: (sha256(out / f), (out / f).stat().st_mtime_ns)
        for f in manifest["files"]
        if f.startswith("onnx/")
    }
    del failures["prefill"]
    calls.clear()
    retried = invoke("engines", out)
    assert retried.exit_code == 0, retried.output
    built = [a["path"].rsplit("/", 1)[-1] for n, a in calls if n == "NetworkFromOnnxPath"]
    assert built == ["prefill.onnx", "decode.onnx"]
    assert {f: (sha256(out / f), (out / f).stat().st_mtime_ns) for f in onnx} == onnx
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert manifest["tensorrt"]["built"] and manifest["tensorrt"]["status"] == "built"
    assert "reason" not in manifest["tensorrt"]
    assert all(f"engines/{n}.engine" in manifest["files"] for n in ("vision", "prefill", "decode"))
    # and the engines run (the stand-in runs each ONNX file through its bound addresses)
    ran = invoke(
        "run",
        out,
        "--token-ids",
        "500,20,21",
        "--max-new-tokens",
        3,
        "--json",
        "--backend",
        "tensorrt",
    )
    assert ran.exit_code == 0, ran.output
    again = invoke("engines", out)
    assert again.exit_code == 0 and "every engine is built" in again.output


def test_engines_skip_writes_no_engine_and_says_so(tmp_path, monkeypatch):
    out = tmp_path / "art"
    result = invoke(
        "build", "--model", "tiny", "--out", out, "--max-seq-len", 64, "--precision", "bf16",
        "--engines", "skip",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        f"TensorRT engines not built: --engines skip; mllama-export engines {out}" in result.output
    )
    assert sorted(p.name for p in (out / "engines").iterdir()) == ["trtexec.sh"]
    entry = read_manifest(out)["tensorrt"]
    assert entry["status"] == "skipped" and entry["built"] is False
    assert {e["status"] for e in entry["engines"].values()} == {"pending"}
    assert read_manifest(out)["build_options"]["engines"] == "skip"
    # the engines of these artifacts, later, where TensorRT runs
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    line = one_line_error(invoke("engines", out))
    assert "cannot build TensorRT engines here: TensorRT is not installed" in line


def test_engines_require_without_tensorrt_exits_2_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "art"
    line = one_line_error(invoke("build", "--model", "tiny", "--out", out, "--engines", "require"))
    assert "--engines require: engines cannot be built here: TensorRT is not installed" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_engines_require_refuses_fp8_below_compute_capability_8_9(trt11, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_stage, "cuda_device", lambda: ("NVIDIA A100", (8, 0)))
    out = tmp_path / "art"
    args = ["build", "--model", "tiny", "--out", out, "--precision", "fp8", "--engines", "require"]
    line = one_line_error(invoke(*args))
    assert "FP8 engines need a GPU of compute capability 8.9 or later" in line
    assert "NVIDIA A100 has 8.0" in line and not out.exists()


def test_a_profile_over_the_tensor_cap_is_refused_before_work(tmp_path):
    out = tmp_path / "art"
    args = ["build", "--model", "11b", "--out", out, "--max-batch", 16, "--max-seq-len", 8192]
    line = one_line_error(invoke(*args))
    assert "the prefill engine's present_key would be 32x16x8x8192x128" in line
    assert "over TensorRT's limit of 2^31-1" in line
    assert "--max-batch 7 or --max-seq-len 4095" in line and "--engines skip" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_engines_on_a_folder_that_is_not_artifacts_is_one_line(tmp_path):
    line = one_line_error(invoke("engines", tmp_path / "nothing"))
    assert "does not exist" in line
    refused = invoke("engines", tmp_path, "text")
    assert (
        refused.exit_code == 2
        and "'text' is not one of 'vision', 'prefill', 'decode'" in refused.output
    )
