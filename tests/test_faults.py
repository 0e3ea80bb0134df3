"""Interrupted builds leave nothing complete-looking; tampered artifacts are refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mllama_export.cli import main
from mllama_export.exporter.outdir import build_lock

BUILD = [
    sys.executable,
    "-m",
    "mllama_export",
    "build",
    "--model",
    "tiny",
    "--max-seq-len",
    "64",
]


def build_cmd(out, *extra, kill_at=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if kill_at:
        env["MLLAMA_EXPORT_KILL_AT"] = kill_at
    return subprocess.run(
        [*BUILD, "--out", str(out), *extra], env=env, capture_output=True, text=True
    )


def test_a_killed_build_leaves_nothing_complete_and_the_next_build_succeeds(tmp_path):
    out = tmp_path / "art"
    for point in ("export:prefill", "external-data:vision", "manifest"):
        result = build_cmd(out, kill_at=point)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-500:])
        assert not out.exists(), point
        partial = list(tmp_path.glob(".art.partial-*"))
        assert len(partial) == 1 and (partial[0] / "BUILD-INCOMPLETE").exists(), point
        assert not (partial[0] / "manifest.json").exists(), point
    refused = CliRunner().invoke(main, ["run", str(out), "--token-ids", "1"])
    assert refused.exit_code == 2 and "does not exist" in refused.output
    # A partial folder is refused by name too, should anyone point at it.
    refused = CliRunner().invoke(main, ["run", str(partial[0]), "--token-ids", "1"])
    assert refused.exit_code == 2 and "incomplete build" in refused.output
    result = build_cmd(out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".art.partial-*"))


def test_a_killed_rebuild_keeps_the_previous_artifacts(tmp_path, ort_artifacts):
    out = tmp_path / "art"
    shutil.copytree(ort_artifacts, out)
    before = (out / "manifest.json").read_text()
    result = build_cmd(out, "--force", kill_at="export:vision")
    assert result.returncode == -signal.SIGKILL
    assert (out / "manifest.json").read_text() == before


def test_two_builds_into_one_folder_are_prevented(tmp_path):
    out = tmp_path / "art"
    with build_lock(out):
        result = CliRunner().invoke(main, ["build", "--model", "tiny", "--out", str(out)])
    assert result.exit_code == 2 and "another build" in result.output
    assert not out.exists()


@pytest.mark.parametrize("target", ["onnx/decode.onnx", "onnx/text.onnx.data", "tokenizer.json"])
def test_a_tampered_artifact_is_refused_naming_the_file(tmp_path, ort_artifacts, target):
    out = tmp_path / "art"
    shutil.copytree(ort_artifacts, out)
    path = out / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["run", str(out), "--token-ids", "500,1"])
    assert result.exit_code == 2
    assert target in result.output and "sha256" in result.output


def test_external_data_outside_the_folder_is_refused(tmp_path, ort_artifacts):
    import onnx

    from mllama_export.engines.manifest_read import check_external_data
    from mllama_export.errors import MllamaExportError

    out = tmp_path / "art"
    shutil.copytree(ort_artifacts, out)
    model = onnx.load(str(out / "onnx/decode.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = "../../../etc/passwd"
    onnx.save(model, str(out / "onnx/decode.onnx"))
    with pytest.raises(MllamaExportError, match="points outside"):
        check_external_data(out, out / "onnx/decode.onnx")


def test_what_a_killed_build_leaves_is_named_and_only_its_own_build_removes_it(
    tmp_path, ort_artifacts
):
    from mllama_export.exporter.outdir import stale_leftovers

    out = tmp_path / "art"
    shutil.copytree(ort_artifacts, out)
    result = build_cmd(out, "--force", kill_at="export:vision")
    assert result.returncode == -signal.SIGKILL
    left = {x.kind: x for x in stale_leftovers(tmp_path)}
    assert set(left) == {"partial folder", "lock"}, left
    assert left["lock"].pid == left["partial folder"].pid  # the lock names its build
    shown = CliRunner().invoke(main, ["inspect", str(out), "--no-verify"])
    assert shown.exit_code == 0, shown.output
    assert f".art.partial-{left['lock'].pid} (partial folder left by build process" in shown.output
    assert "`mllama-export build --out" in shown.output
    # a build of another folder beside it names them and leaves them
    other = build_cmd(tmp_path / "other")
    assert other.returncode == 0, other.stderr[-2000:]
    assert "note: " in other.stderr and ".art.partial-" in other.stderr
    assert left["partial folder"].path.exists()
    # the next build of the same folder removes them
    again = build_cmd(out, "--force")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "removed " in again.stderr and stale_leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "other"]


def test_a_live_build_is_not_stale(tmp_path):
    from mllama_export.exporter.outdir import build_lock, partial_path, stale_leftovers

    out = tmp_path / "art"
    with build_lock(out):
        partial_path(out).mkdir()
        (partial_path(out) / "BUILD-INCOMPLETE").write_text("mllama-export build in progress\n")
        assert stale_leftovers(tmp_path) == []
        assert str(os.getpid()) in (tmp_path / ".art.lock").read_text()
