"""Issue 17's proof that a second family plugs in from its own files: the stand-in text-only
decoder (tests/standin_family.py, one graph, no cache) is synthesized, built, run and judged by
the same CLI commands as Mllama, and what it lacks (FP8, a planner, images) is refused in one
line. Nothing in the four folders or the CLI names it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import standin_family
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mllama_export.cli import main
from mllama_export.engines.runner import Runner
from mllama_export.graphs import family as registry
from mllama_export.graphs.checkpoint import load_model
from mllama_export.graphs.limits import Limits

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def standin():
    registry.register(standin_family.FAMILY)
    try:
        yield standin_family.FAMILY
    finally:
        registry._FAMILIES.pop(standin_family.FAMILY.name)


@pytest.fixture(scope="module")
def built(standin, tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    synth = cli("synth", "--preset", "standin-tiny", "--seed", 3, "--out", root / "ckpt")
    assert synth.exit_code == 0, synth.output
    out = cli(
        "build", "--model", root / "ckpt", "--out", root / "out", "--max-seq-len", 32,
        "--max-batch", 3,
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    return root


def test_it_builds_one_graph_with_its_own_contract(built):
    manifest = json.loads((built / "out" / "manifest.json").read_text())
    assert list(manifest["graphs"]) == ["lm"]
    lm = manifest["graphs"]["lm"]
    assert [i["name"] for i in lm["inputs"]] == ["input_ids", "attention_mask"]
    assert lm["check"]["ran"] and lm["check"]["depth"] == "full"
    assert manifest["model"]["config"]["model_type"] == "standin_lm"
    assert "xattn_mask" not in manifest["model"]  # Mllama's fields are Mllama's
    assert not manifest["tensorrt"]["built"] and "profiles" in manifest["tensorrt"]["reason"]


def test_it_runs_as_its_pytorch_model_generates(built):
    result = cli("run", built / "out", "--token-ids", "5,9,17,4", "--max-new-tokens", 6, "--json")
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)["token_ids"]
    model = load_model(built / "ckpt")
    torch_runner = Runner.from_model(model, Limits(3, 32, 0))
    expected = torch_runner.generate_ids([[5, 9, 17, 4]], max_new_tokens=6).token_ids[0]
    assert ours == expected and len(ours) >= 1


def test_the_gate_passes_it_and_fails_it_against_a_perturbed_checkpoint(built, tmp_path):
    passed = cli("validate", built / "out", "--steps", 3, "--report", tmp_path / "ok")
    assert passed.exit_code == 0, passed.output
    drift = json.loads((tmp_path / "ok" / "drift.json").read_text())
    assert [c["case"] for c in drift["cases"]] == ["single", "padded"]
    for case in drift["cases"]:
        stages = [s["stage"] for s in case["stages"]]
        assert stages == ["prefill", "decode[0]", "decode[1]", "decode[2]"]
    other = tmp_path / "perturbed"
    shutil.copytree(built / "ckpt", other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.lm_head.weight"] = tensors["model.lm_head.weight"] * 1.5
    save_file(tensors, other / "model.safetensors")
    failed = cli("validate", built / "out", "--steps", 3, "--checkpoint", other)
    assert failed.exit_code == 1, failed.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("build", "--precision", "fp8"), "stand-in text-only decoder family has no FP8"),
        (("plan",), "stand-in text-only decoder family has no plan"),
    ],
)
def test_what_it_lacks_is_refused_in_one_line(built, tmp_path, args, message):
    model = ("--model", built / "ckpt")
    extra = ("--out", tmp_path / "fp8") if args[0] == "build" else ()
    result = cli(args[0], *model, *extra, *args[1:])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_images_are_refused_by_its_own_input_processor(built):
    image = ROOT / "tests" / "standin_family.py"  # never read: the family refuses any image
    result = cli("run", built / "out", "--token-ids", "5,9", "--image", image)
    assert result.exit_code == 2 and "takes no --image" in result.output, result.output


def test_no_file_outside_its_own_names_it():
    named = [
        str(path.relative_to(ROOT))
        for folder in ("graphs", "engines", "exporter", "validate", "mllama_export")
        for path in (ROOT / folder).rglob("*.py")
        if "standin" in path.read_text().lower()
    ]
    assert named == []


def test_its_outputs_are_deterministic_and_finite(built):
    runner = Runner.from_artifacts(built / "out")
    gen = runner.generate_ids([[5, 9], [7]], max_new_tokens=3, keep_logits=True)
    assert np.isfinite(gen.prefill_logits).all() and gen.prompt_mask.tolist() == [[1, 1], [0, 1]]


def test_an_fp16_build_of_it_passes_the_gate_at_fp16_limits(built, tmp_path):
    out = tmp_path / "fp16"
    result = cli("build", "--model", built / "ckpt", "--out", out, "--precision", "fp16",
                 "--max-seq-len", 32)  # fmt: skip
    assert result.exit_code == 0, result.output
    judged = cli("validate", out, "--steps", 2, "--report", tmp_path / "drift")
    assert judged.exit_code == 0, judged.output
    assert json.loads((tmp_path / "drift" / "drift.json").read_text())["precision"] == "fp16"
