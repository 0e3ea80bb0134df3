"""FP8 layer sensitivity (validate/sensitivity.py) on an `--fp8-vision` build of tiny, with
per-channel weight scales (with the per-tensor default tiny fails one stage of the gate;
tests/test_fp8_verdict.py follows that path)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from mllama_export.cli import main
from mllama_export.engines.manifest_read import read_manifest
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.build import build
from mllama_export.exporter.options import BuildOptions
from mllama_export.validate.gate import run_gate
from mllama_export.validate.sensitivity import run_sensitivity

VISION = ("vision.*", "projector")


@pytest.fixture(scope="session")
def fp8v_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8v") / "tiny-fp8v"
    options = BuildOptions(
        model="tiny", out=out, precision="fp8", fp8_vision=True, fp8_weights="per-channel"
    )
    return build(options)


@pytest.fixture(scope="module")
def vision_sensitivity(fp8v_dir):
    return run_sensitivity(fp8v_dir, layers=VISION, steps=2)


def test_gate_on_fp8_vision_tiny(fp8v_dir):
    report = run_gate(fp8v_dir)
    assert report.passed, report.summary_line()


def test_every_vision_layer_is_ranked_by_its_share_of_the_budget(fp8v_dir, vision_sensitivity):
    rep = vision_sensitivity
    layers = read_manifest(fp8v_dir)["quantization"]["layers"]
    expected = [n for n in layers if n.startswith(("vision.", "projector"))]
    assert sorted(s.label for s in rep.layers) == sorted(expected) and len(expected) == 37
    budgets = [s.budget for s in rep.layers]
    assert budgets == sorted(budgets, reverse=True) and all(0 < b < 1 for b in budgets)
    # the gate's own stages: 5 vision, 6 prefill and 6 x 2 decode steps
    assert all(len(s.report.results) == 5 + 6 + 6 * 2 for s in rep.layers)
    top = rep.layers[0]
    assert top.extreme("rel_l2", "vision") > 0 and top.report.precision == "fp8"
    # a vision layer leaves a text-only prompt exactly as the reference computed it
    text_only = [r for r in top.report.results if r.case == "text-only"]
    assert text_only and all(r.metrics.rel_l2 == 0 for r in text_only)
    assert rep.combined.label == "all 37 layers" and rep.combined.report.passed
    assert rep.combined.budget >= top.budget


def test_the_report_files(vision_sensitivity, tmp_path):
    paths = vision_sensitivity.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert [row["layer"] for row in data["layers"]] == [s.label for s in vision_sensitivity.layers]
    assert data["combined"]["passed"] is True and data["extra"]["steps"] == 2
    md = paths["md"].read_text()
    top = vision_sensitivity.layers[0].label
    assert f"| 1 | `{top}` |" in md and f"--fp8-exclude '{top}'" in md


def test_a_miscalibrated_layer_tops_the_ranking(fp8v_dir, tmp_path):
    """An input scale calibrated on the wrong data (amax 100x too small: the layer's inputs
    saturate) is what the report exists to find."""
    copy = tmp_path / "artifacts"
    shutil.copytree(fp8v_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    bad = "vision.transformer.layers.2.mlp.fc1"
    manifest["quantization"]["layers"][bad]["input_amax"] /= 100
    (copy / "manifest.json").write_text(json.dumps(manifest))
    rep = run_sensitivity(copy, layers=["vision.transformer.layers.2.*"], steps=1)
    assert rep.layers[0].label == bad and rep.layers[0].budget > 1
    assert not rep.layers[0].report.passed and not rep.combined.report.passed
    assert max(s.budget for s in rep.layers[1:]) < 0.5


def test_refusals(fp8v_dir, tmp_path):
    with pytest.raises(MllamaExportError, match="'vision.nope' matches none"):
        run_sensitivity(fp8v_dir, layers=["vision.nope"])
    copy = tmp_path / "fp16"
    shutil.copytree(fp8v_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["precision"] = "fp16"
    del manifest["quantization"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MllamaExportError, match="needs artifacts built with --precision fp8"):
        run_sensitivity(copy)


def test_cli(fp8v_dir, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "sensitivity",
            str(fp8v_dir),
            "--layers",
            "vision.global_transformer.layers.1.*",
            "--steps",
            "1",
            "--top",
            "3",
            "--report",
            str(tmp_path / "report"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "budget", "rel/cos/KL", "layer"]
    assert lines[1].split()[0] == "all"
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "3"]
    assert lines[-1].startswith("FP8 sensitivity of 6 layer(s)")
    assert (tmp_path / "report" / "sensitivity.md").is_file()


def test_an_interrupted_run_keeps_its_finished_rows(fp8v_dir, tmp_path, monkeypatch):
    from mllama_export.validate import sensitivity

    out = tmp_path / "report"
    judge = sensitivity.judge

    def judge_until_two_rows(*args, **kwargs):  # the interrupt comes once two rows are saved
        saved = out / "sensitivity.json"
        if saved.is_file() and len(json.loads(saved.read_text())["layers"]) >= 2:
            raise KeyboardInterrupt
        return judge(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "judge", judge_until_two_rows)
    monkeypatch.setattr(sensitivity, "VARIANTS_PER_PASS", 1)  # one layer per pass
    with pytest.raises(KeyboardInterrupt):
        run_sensitivity(fp8v_dir, layers=["vision.transformer.*"], steps=1, out_dir=out)
    saved = json.loads((out / "sensitivity.json").read_text())
    assert not saved["complete"] and len(saved["layers"]) == 2 and saved["combined"] is None
    assert "INCOMPLETE, 2 of 24 layers finished" in (out / "sensitivity.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["sensitivity.json", "sensitivity.md"]


def test_a_vision_pattern_on_a_build_without_fp8_vision_names_the_flag(fp8v_dir, tmp_path):
    copy = tmp_path / "no-vision"
    shutil.copytree(fp8v_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    layers = manifest["quantization"]["layers"]
    manifest["quantization"]["layers"] = {k: v for k, v in layers.items() if k.startswith("text")}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MllamaExportError, match="only in builds with --fp8-vision"):
        run_sensitivity(copy, layers=["vision.*"])
