"""One resolver for presets, checkpoint folders and Hugging Face Hub ids; Hub ids through a
cache folder in huggingface_hub's own layout (models--owner--name/snapshots/<rev>, refs/main),
offline, as on this machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mllama_export.cli import main
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import preset
from mllama_export.graphs.resolve import is_hub_id, resolve_model

REPO = "test-org/tiny-mllama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, tiny_dir) -> Path:
    """A cache holding REPO at REVISION, as `huggingface-cli download` leaves it."""
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(tiny_dir, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_presets_folders_and_hub_ids(tiny_dir, hub_cache, tmp_path, monkeypatch):
    assert resolve_model("11b").kind == "preset" and resolve_model("11b").path is None
    monkeypatch.chdir(tiny_dir.parent)
    folder = resolve_model(tiny_dir.name)  # a relative path becomes absolute
    assert folder.kind == "folder" and folder.path == tiny_dir and folder.path.is_absolute()
    hub = resolve_model(REPO)
    assert (hub.kind, hub.hub_id, hub.revision) == ("hub", REPO, REVISION)
    assert hub.path == hub_cache / "models--test-org--tiny-mllama" / "snapshots" / REVISION
    assert hub.config == preset("tiny") and hub.to_json()["checkpoint"] == str(hub.path)
    with pytest.raises(MllamaExportError, match=f"not in the cache {hub_cache}"):
        resolve_model("test-org/absent")
    with pytest.raises(MllamaExportError, match="neither a checkpoint folder, a preset"):
        resolve_model("not a hub id")
    assert is_hub_id(REPO) and not is_hub_id("../x/y") and not is_hub_id("a/b/c")


def test_a_hub_snapshot_without_its_config_is_named(hub_cache):
    snapshot = hub_cache / "models--test-org--tiny-mllama" / "snapshots" / REVISION
    (snapshot / "config.json").unlink()
    with pytest.raises(MllamaExportError, match="has no config.json"):
        resolve_model(REPO)


def test_plan_and_synth_take_a_hub_id(hub_cache, tmp_path):
    result = CliRunner().invoke(main, ["plan", "--model", REPO])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["synth", "--preset", REPO, "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "s" / "config.json").read_text())
    assert written == preset("tiny").to_hf_dict()


def test_a_build_from_a_hub_id_is_validated_from_another_folder(hub_cache, tmp_path, monkeypatch):
    out = tmp_path / "art"
    result = CliRunner().invoke(main, ["build", "--model", REPO, "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert (model["source"], model["kind"], model["hub_id"]) == (REPO, "hub", REPO)
    assert model["revision"] == REVISION and Path(model["checkpoint"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("HF_HUB_CACHE")  # the manifest's absolute path is enough
    gate = CliRunner().invoke(main, ["validate", str(out), "--steps", "1"])
    assert gate.exit_code == 0, gate.output
    assert f"reference from {model['checkpoint']}" in gate.output
    assert gate.stdout.splitlines()[-1].startswith("PASS")
