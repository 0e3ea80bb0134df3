"""The accuracy gate (`mllama-export validate`, validate/gate.py) on LLaVA artifacts: correct
builds pass against both references at fp32 and fp16, and a changed weight fails, with exit 1,
at the stage where the drift starts.

Two builds per module, through the CLI as a user runs it: llava-tiny in fp32 and
llava-next-tiny in fp16 (~20 s each). Broken artifacts are copies under tmp_path with one
initializer rewritten and the manifest re-hashed (tests/artifact_edits.py, the mechanism of
tests/test_gate.py): without the re-hash the gate refuses them on their sha256 (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from artifact_edits import copy_artifacts, perturb, rehash
from click.testing import CliRunner
from conftest import write_evalset

from mllama_export.cli import main
from mllama_export.engines.manifest_read import read_manifest
from mllama_export.graphs.family import family_of_config
from mllama_export.graphs.limits import Limits
from mllama_export.validate.gate import load_cases, run_gate

pytest.importorskip("transformers")

STEPS = 2  # enough to see a fault start at decode[0] and persist to decode[1]
BUILDS = {
    "llava-tiny-fp32": ("llava-tiny", "fp32"),
    "llava-next-tiny-fp16": ("llava-next-tiny", "fp16"),
}
LABELS = {"graphs": "PyTorch graphs fp32", "transformers": "transformers fp32"}
TEXT_WEIGHT = "text.layers.1.mlp.down_proj.weight.transposed"  # shared by prefill and decode
VISION_WEIGHT = "vision.embeddings.patch_embedding.weight"


def cli(*args) -> tuple[int, str]:
    """Exit code and last line of ``mllama-export ARGS``."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    lines = result.output.strip().splitlines()
    return result.exit_code, lines[-1] if lines else ""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava-gate")
    folders = {}
    for name, (preset, precision) in BUILDS.items():
        out = root / name
        code, last = cli("build", "--model", preset, "--precision", precision, "--out", out)
        assert code == 0 and last == f"wrote {out}", last
        folders[name] = out
    return folders


def validate(folder: Path, report: Path, *args) -> tuple[int, str, dict]:
    """`mllama-export validate` of ``folder``: exit code, verdict line and drift.json."""
    code, last = cli("validate", folder, "--steps", STEPS, "--report", report, *args)
    drift = report / "drift.json"
    return code, last, json.loads(drift.read_text()) if drift.is_file() else {}


def evalset(folder: Path, *names: str) -> list:
    """The artifacts' built-in evaluation set, or its named cases (fewer cases, less time)."""
    manifest = read_manifest(folder)
    family = family_of_config(manifest["model"]["config"])
    config = family.read_config(manifest["model"]["config"])
    cases = family.part("evalset").build_evalset(config, Limits(**manifest["limits"]), STEPS)
    return [c for c in cases if c.name in names or not names]


def first_failures(drift: dict) -> dict[str, str | None]:
    """Each case's first failing stage, in the order the gate ran them (None: passed)."""
    return {
        c["case"]: next((s["stage"] for s in c["stages"] if not s["passed"]), None)
        for c in drift["cases"]
    }


def nudge(rel: float):
    """A change of ``rel`` times the weight's spread, random per value: unlike a uniform
    scale, no layer norm downstream can undo it (CLIP's pre-norm absorbs a scaled patch
    embedding almost entirely)."""

    def change(w: np.ndarray) -> np.ndarray:
        noise = np.random.default_rng(0).standard_normal(w.shape)
        return w + rel * float(np.std(w.astype(np.float32))) * noise

    return change


def worst_rel_l2(drift: dict) -> float:
    return max(s["metrics"]["rel_l2"] for c in drift["cases"] for s in c["stages"])


# -- correct artifacts pass --------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["graphs", "transformers"])
@pytest.mark.parametrize("name", BUILDS)
def test_correct_artifacts_pass(built, name, reference, tmp_path):
    folder, precision = built[name], BUILDS[name][1]
    code, last, drift = validate(folder, tmp_path, "--reference", reference)
    assert code == 0, last
    assert last.startswith(f"PASS {precision} onnxruntime vs {LABELS[reference]}"), last
    cases = evalset(folder)
    assert [c["case"] for c in drift["cases"]] == [c.name for c in cases]
    for case, judged in zip(cases, drift["cases"], strict=True):
        expected = ["vision"] if case.num_images else []  # the image features, before prefill
        expected += ["prefill", *(f"decode[{i}]" for i in range(STEPS))]
        assert [s["stage"] for s in judged["stages"]] == expected
    if "next" in name:  # every pinpoint's grid and unpadding is judged
        assert sum(c.name.startswith("pinpoint-") for c in cases) == 5
    worst = worst_rel_l2(drift)
    # fp32: ORT against PyTorch, ~1e-6; fp16: rounding visible (~1e-3), inside its 1e-2
    assert worst < 1e-5 if precision == "fp32" else 3e-4 < worst < 5e-3, worst


# -- a changed weight fails where the drift starts ----------------------------------------------


def test_a_changed_text_weight_fails_at_prefill(built, tmp_path):
    folder = copy_artifacts(built["llava-tiny-fp32"], tmp_path)
    old = perturb(folder, "prefill", TEXT_WEIGHT, lambda w: w * 1.02)  # prefill's and decode's
    code, last, _ = validate(folder, tmp_path / "refused")
    assert code == 2 and "sha256" in last, last  # tampered: refused, not judged
    rehash(folder)
    code, last, drift = validate(folder, tmp_path / "drift")
    assert code == 1 and last.startswith("FAIL fp32"), last
    assert "drift starts at prefill" in last, last
    assert set(first_failures(drift).values()) == {"prefill"}  # every case, text-only too
    stages = [s for c in drift["cases"] for s in c["stages"]]
    assert all(s["passed"] for s in stages if s["stage"] == "vision")
    assert old.dtype == np.float32 and old.size == 128 * 64


def test_a_changed_weight_of_the_decode_graph_alone_fails_at_decode_0(built, tmp_path):
    folder = copy_artifacts(built["llava-tiny-fp32"], tmp_path)
    perturb(folder, "decode", "text.embed_tokens.weight", lambda w: w * 1.02, only_this_graph=True)
    rehash(folder)
    report = run_gate(folder, cases=evalset(folder, "text-only", "two-images"), steps=STEPS)
    assert not report.passed and report.first_failure.stage == "decode[0]"
    firsts = report.first_failure_by_case()
    assert {r.stage for r in firsts.values()} == {"decode[0]"}
    assert all(r.passed for r in report.results if r.stage in ("vision", "prefill"))


def test_a_changed_vision_weight_fails_at_vision(built, tmp_path):
    folder = copy_artifacts(built["llava-tiny-fp32"], tmp_path)
    perturb(folder, "vision", VISION_WEIGHT, nudge(0.01))
    rehash(folder)
    code, last, drift = validate(folder, tmp_path / "drift")
    assert code == 1 and "drift starts at vision" in last, last
    firsts = first_failures(drift)
    assert firsts.pop("text-only") is None  # no image, no vision graph: untouched
    assert set(firsts.values()) == {"vision"}


def test_a_changed_vision_weight_of_llava_next_in_fp16_fails_at_vision(built, tmp_path):
    """Through the tiles of every grid (anyres) and fp16's wider limits."""
    folder = copy_artifacts(built["llava-next-tiny-fp16"], tmp_path)
    perturb(folder, "vision", VISION_WEIGHT, nudge(0.05))
    rehash(folder)
    cases = evalset(folder, "text-only", "one-image", "pinpoint-112x112")
    report = run_gate(folder, cases=cases, steps=STEPS)
    firsts = report.first_failure_by_case()
    assert firsts.pop("text-only") is None
    assert {r.stage for r in firsts.values()} == {"vision"} and len(firsts) == 2


# -- a user's evaluation set --------------------------------------------------------------------

USER_LINES = [
    '{"prompt": "What is in the image?", "images": ["wide.png"]}',
    "",
    '{"prompt": "USER: <image> or <image>? ASSISTANT:", "images": ["tall.png", "wide.png"], '
    '"name": "two"}',
    '{"prompt": "Plain text."}',
]


@pytest.mark.parametrize("name", BUILDS)
def test_a_users_evalset_is_tokenized_preprocessed_and_judged(built, name, tmp_path):
    evalset = write_evalset(tmp_path / "evalset", USER_LINES)
    cases = load_cases(evalset, built[name])
    assert [(c.name, c.num_images) for c in cases] == [("line-1", 1), ("two", 2), ("line-4", 0)]
    code, last, drift = validate(
        built[name], tmp_path / "drift", "--evalset", evalset, "--reference", "transformers"
    )
    assert code == 0 and last.startswith("PASS") and "3 case(s)" in last, last
    assert first_failures(drift) == {"line-1": None, "two": None, "line-4": None}


def test_a_malformed_evalset_line_is_named(built, tmp_path):
    evalset = write_evalset(tmp_path / "evalset", ['{"prompt": "fine"}', '{"prompt": 3}'])
    code, last, _ = validate(built["llava-tiny-fp32"], tmp_path / "drift", "--evalset", evalset)
    assert code == 2 and "line 2" in last, last
