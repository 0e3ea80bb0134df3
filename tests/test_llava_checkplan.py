"""LLaVA's check plan (exporter/llava_checkplan.py): the memory estimate of the whole-model
check, `--check-depth auto|full|reduced`, and the reduced copy made of the checkpoint's own
tensors, checked by a real build of both tiny presets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch

from mllama_export.errors import MllamaExportError
from mllama_export.exporter import buildplan, checkmemory, llava_checkplan
from mllama_export.exporter.build import build
from mllama_export.exporter.llava_checkplan import (
    CHECK_CASES,
    budget,
    estimate,
    graph_sizes,
    plan_check,
    reduced_copy,
    write_reduced_checkpoint,
)
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.checkpoint import Checkpoint, load_model
from mllama_export.graphs.llava_contract import GRAPHS
from mllama_export.graphs.llava_presets import LLAVA_PRESETS, llava_preset
from mllama_export.graphs.synthetic import write_checkpoint


def options(precision="fp32", **kw) -> BuildOptions:
    return BuildOptions(model="llava-tiny", out=Path("x"), precision=precision, **kw)


def first_cases():
    return {g: [CHECK_CASES[0]] for g in GRAPHS}


def room_for(peak: int) -> int:
    """The memory available at which a build plans with exactly ``peak`` bytes."""
    return int((peak + llava_checkplan.BUDGET_RESERVE) / llava_checkplan.BUDGET_SHARE) + 1


def _small():
    """llava-tiny with a 7B-like vocabulary and a wider decoder: the check's memory is mostly
    the model's here, not the libraries' (at tiny's own size the export's libraries are the
    peak, whatever the check runs on)."""
    c = llava_preset("llava-tiny")
    text = replace(c.text, hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64,
                   intermediate_size=1024, vocab_size=32064, bos_token_id=1,
                   eos_token_ids=(2,))  # fmt: skip
    return replace(c, text=text, image_token_id=32000, pad_token_id=32001)


SMALL = _small()


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-checkplan")
    return {
        n: write_checkpoint(llava_preset(n), root / n, seed=3)
        for n in ("llava-tiny", "llava-next-tiny")
    }


# -- the estimate and the decision ------------------------------------------------------------


def test_the_estimate_grows_with_the_weights_and_the_precision():
    tiny, seven, big = (llava_preset(n) for n in ("llava-tiny", "llava-1.5-7b", "llava-next-34b"))
    fp16 = [estimate(c, "fp16", first_cases()) for c in (tiny, seven, big)]
    assert fp16[0].peak < fp16[1].peak < fp16[2].peak
    # PyTorch holds every weight: at least the 7B's 14 GB of fp16 weights, twice that in fp32
    weights = graph_sizes(seven).total
    assert fp16[1].reference >= 2 * weights and fp16[1].peak > 24e9
    assert estimate(seven, "fp32", first_cases()).reference >= 4 * weights
    more = {g: [CHECK_CASES[0], CHECK_CASES[1]] for g in GRAPHS}
    assert estimate(seven, "fp16", more).reference > fp16[1].reference


@pytest.mark.parametrize("name", sorted(LLAVA_PRESETS))
def test_a_real_size_build_on_a_24_gb_machine_checks_a_reduced_copy_that_fits(name):
    config = llava_preset(name)
    plan = plan_check(options("fp16"), config, available=24 << 30)
    if name.endswith("tiny"):
        assert plan.depth == "full"
        return
    assert plan.depth == "reduced" and plan.estimate.peak <= budget(24 << 30)
    assert "the whole model needs" in plan.reason
    t = plan.config.text
    assert (t.num_layers, t.hidden_size) == (2, config.text.hidden_size)
    assert plan.config.vision.hidden_size == config.vision.hidden_size
    assert graph_sizes(plan.config).total < graph_sizes(config).total / 10


def test_auto_full_reduced_and_the_refusals():
    config = SMALL
    full = estimate(config, "fp32", first_cases()).peak
    small = estimate(reduced_copy(config).config, "fp32", first_cases()).peak
    assert small < full
    assert plan_check(options(), config, 64 << 30).depth == "full"
    tight = plan_check(options(), config, room_for(full) - 2)
    assert tight.depth == "reduced" and tight.config == reduced_copy(config).config
    with pytest.raises(MllamaExportError, match="--check-depth full needs"):
        plan_check(options(check_depth="full"), config, room_for(full) - 2)
    with pytest.raises(MllamaExportError, match="even on a reduced copy"):
        plan_check(options(), config, room_for(small) - 2)
    assert plan_check(options(check_depth="reduced"), config, 64 << 30).depth == "reduced"
    assert plan_check(options("bf16"), config, 1).depth == "none"
    assert (
        plan_check(options("fp8"), config, 64 << 30).estimate
        == plan_check(options("fp16"), config, 64 << 30).estimate
    )


def test_fp8_calibration_is_refused_only_where_one_layer_does_not_fit():
    config = llava_preset("llava-1.5-7b")
    need = llava_checkplan.calibration_memory(config)
    llava_checkplan.refuse_fp8_calibration(options("fp8"), config, need)
    llava_checkplan.refuse_fp8_calibration(options("fp16"), config, 1)
    with pytest.raises(MllamaExportError, match="one layer at a time"):
        llava_checkplan.refuse_fp8_calibration(options("fp8"), config, need - 1)


# -- the reduced copy --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LLAVA_PRESETS))
def test_the_copy_keeps_the_feature_layers_meaning(name):
    config = llava_preset(name)
    copy = reduced_copy(config).config
    # -2: the penultimate layer's output, one layer below the copy's top as in the model
    assert copy.vision_feature_layer == config.vision_feature_layer == -2
    assert (
        copy.vision.num_layers - copy.vision_depth == config.vision.num_layers - config.vision_depth
    )
    assert copy.text.vocab_size == min(config.text.vocab_size, llava_checkplan.REDUCED_VOCAB)
    t = copy.text
    ids = [copy.image_token_id, t.bos_token_id, *t.eos_token_ids, t.pad_token_id, copy.pad_token_id]
    assert all(0 <= i < t.vocab_size for i in ids if i is not None)


@pytest.mark.parametrize("name", ["llava-tiny", "llava-next-tiny"])
def test_the_reduced_copys_tensors_are_the_checkpoints(name, tiny_ckpts, tmp_path):
    config = llava_preset(name)
    copy = reduced_copy(config)
    folder = write_reduced_checkpoint(Checkpoint(tiny_ckpts[name], config), copy, tmp_path / "copy")
    small, full = load_model(folder).state_dict(), load_model(tiny_ckpts[name]).state_dict()
    assert set(small) < set(full)
    assert (
        "text.layers.1.mlp.gate_proj.weight" in small
        and "text.layers.2.mlp.gate_proj.weight" not in small
    )
    assert all(torch.equal(t, full[n]) for n, t in small.items()), [
        n for n, t in small.items() if not torch.equal(t, full[n])
    ]
    if config.is_next:
        assert torch.equal(small["image_newline"], full["image_newline"])


def test_a_copy_with_fewer_vocabulary_rows_keeps_the_special_tokens_rows(
    tiny_ckpts, tmp_path, monkeypatch
):
    config = llava_preset("llava-tiny")
    monkeypatch.setattr(llava_checkplan, "REDUCED_VOCAB", 300)
    copy = reduced_copy(config)
    # image 403, BOS 401, EOS 402, pad 404 lie past row 300: they close the copy's rows
    assert copy.moved == (401, 402, 403, 404)
    c = copy.config
    assert (c.text.bos_token_id, c.text.eos_token_ids, c.image_token_id, c.pad_token_id) == (
        296,
        (297,),
        298,
        299,
    )
    folder = write_reduced_checkpoint(
        Checkpoint(tiny_ckpts["llava-tiny"], config), copy, tmp_path / "copy"
    )
    small, full = load_model(folder), load_model(tiny_ckpts["llava-tiny"])
    for name in ("embed_tokens", "lm_head"):
        kept, original = getattr(small.text, name).weight, getattr(full.text, name).weight
        assert kept.shape[0] == 300 and torch.equal(kept[:296], original[:296])
        assert torch.equal(kept[296:], original[401:405])


# -- builds ------------------------------------------------------------------------------------


def _checks(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    return {g: v["check"] for g, v in manifest["graphs"].items()}


# One build per preset: llava-tiny asks for the copy, llava-next-tiny gets it from auto with
# the memory a build plans with patched small.
@pytest.mark.parametrize("name, depth", [("llava-tiny", "reduced"), ("llava-next-tiny", "auto")])
def test_a_build_checks_a_reduced_copy_and_records_it(
    name, depth, tiny_ckpts, tmp_path, monkeypatch
):
    given = BuildOptions(model=str(tiny_ckpts[name]), out=tmp_path / "art", check_depth=depth)
    if depth == "auto":
        # at tiny's size the export's libraries are the peak: left out here, so that the
        # check's own estimate decides, as it does at the real sizes (a library constant:
        # every family's estimate reads it in exporter/checkmemory.py)
        monkeypatch.setattr(checkmemory, "EXPORT_LIBRARY_BYTES", 0)
        full = estimate(llava_preset(name), "fp32", first_cases()).peak
        monkeypatch.setattr(llava_checkplan, "available_memory", lambda: room_for(full) - 2)
    plan = buildplan.plan_build(given, given.out).check
    why = "--check-depth reduced" if depth == "reduced" else "the whole model needs"
    assert plan.depth == "reduced" and why in plan.reason
    out = build(given)
    checks = _checks(out)
    assert set(checks) == set(GRAPHS)
    for check in checks.values():
        assert check["ran"] and "reduced copy at the real widths" in check["depth"]
        assert "the first 2 of 4 text layers" in check["depth"]
        assert "the first 1 of 2 CLIP layers that run (feature layer -2" in check["depth"]
        assert why in check["depth"]
        assert check["memory_estimate_bytes"] == plan.estimate.peak > 0
        assert max(m["rel_l2"] for m in check["outputs"].values()) < 1e-4
    assert not any(p.name.startswith(".reduced") for p in out.rglob("*"))
    decode = onnx.load(str(out / "onnx/decode.onnx"), load_external_data=False)
    new_key = next(o for o in decode.graph.output if o.name == "new_key")
    assert new_key.type.tensor_type.shape.dim[0].dim_value == 4  # the artifacts: all 4 layers
