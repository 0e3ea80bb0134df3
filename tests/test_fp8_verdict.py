"""An honest FP8 verdict: where FP8 drifts past the fp8 limits, `validate` exits 1 naming the
worst stages and points to `mllama-export sensitivity`, which suggests the `--fp8-exclude`
patterns; the rebuild with them passes.

tiny with the default per-tensor weight scales fails one stage of the gate (cosine 0.9839
against 0.99 at decode[3] of `text-only`): the whole path runs on it (~2.5 minutes).
"""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from mllama_export.cli import main
from mllama_export.exporter.build import build
from mllama_export.exporter.options import BuildOptions
from mllama_export.validate.sensitivity import exclusion_patterns, rebuild_command


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fail_the_gate_rank_exclude_rebuild_pass(fp8_dir, tmp_path):
    folder = tmp_path / "tiny-fp8"
    shutil.copytree(fp8_dir, folder)
    failed = _cli("validate", folder)
    assert failed.exit_code == 1, failed.output
    lines = failed.stdout.splitlines()
    verdict, worst, advice = lines[-3:]
    assert verdict.startswith("FAIL fp8")
    assert worst.startswith("FP8 drift over the fp8 limits; worst stages: decode[3] of 'text-only'")
    assert f"mllama-export sensitivity {folder}" in advice and "--fp8-exclude" in advice

    ranked = _cli("sensitivity", folder)
    assert ranked.exit_code == 0, ranked.output
    report = json.loads((folder / "sensitivity" / "sensitivity.json").read_text())
    suggestion = report["suggestion"]
    assert report["combined"]["passed"] is False and suggestion["reached"]
    assert suggestion["exclude"] == [report["layers"][0]["layer"]]  # the top of the ranking
    assert suggestion["remaining"]["budget"] <= suggestion["target_budget"] == 0.8
    assert "--fp8-exclude" in ranked.stdout.splitlines()[-2]

    # validate now hands over the rebuild line the ranking suggests
    again = _cli("validate", folder)
    assert again.exit_code == 1 and "suggests keeping 1 layer(s) in 16 bits" in again.stdout
    assert "mllama-export build --model tiny" in again.stdout.splitlines()[-1]

    out = tmp_path / "excluded"
    options = BuildOptions(
        model="tiny", out=out, precision="fp8", fp8_exclude=tuple(suggestion["patterns"])
    )
    build(options)
    passed = _cli("validate", out)
    assert passed.exit_code == 0, passed.output
    assert passed.stdout.splitlines()[-1].startswith("PASS fp8")


def test_exclusion_patterns_and_the_rebuild_line():
    quantized = [f"text.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj")]
    quantized += ["text.layers.1.mlp.up_proj", "projector"]
    chosen = ["text.layers.0.self_attn.k_proj", "projector", "text.layers.0.self_attn.q_proj"]
    assert exclusion_patterns(chosen, quantized) == ["text.layers.0.*", "projector"]
    assert exclusion_patterns(["text.layers.0.self_attn.q_proj"], quantized) == [
        "text.layers.0.self_attn.q_proj"
    ]
    options = {
        "model": "ckpt/x",
        "out": "out/x",
        "fp8_weights": "per-channel",
        "fp8_exclude": ["a"],
    }
    assert rebuild_command(options, ["b.*"]) == (
        "mllama-export build --model ckpt/x --out out/x-excluded --precision fp8 "
        "--fp8-weights per-channel --fp8-exclude 'a' --fp8-exclude 'b.*'"
    )
    # the limits and mask it was built with come along; build's defaults are left out
    built = {**options, "max_seq_len": 1024, "max_batch": 4, "xattn_mask": "hf", "seed": 0}
    assert rebuild_command(built, []) == (
        "mllama-export build --model ckpt/x --out out/x-excluded --precision fp8 "
        "--fp8-weights per-channel --max-seq-len 1024 --xattn-mask hf --fp8-exclude 'a'"
    )
