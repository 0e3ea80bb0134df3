"""The check's plan: which model and cases it runs on, decided up front from a memory estimate
that these tests hold against the peaks measured in child processes; the reduced copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch

from mllama_export.errors import MllamaExportError
from mllama_export.exporter import checkplan
from mllama_export.exporter.build import build
from mllama_export.exporter.checkplan import (
    CHECK_CASES,
    budget,
    estimate,
    graph_sizes,
    plan_check,
    reduced_copy,
    write_reduced_checkpoint,
)
from mllama_export.exporter.fp8_cases import check_cases
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.config import MllamaConfig, preset
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.synth import write_checkpoint
from mllama_export.graphs.weights import Checkpoint, load_model

GB = 1e9
GRAPHS = ("vision", "prefill", "decode")


def first_cases():
    return {g: [CHECK_CASES[0]] for g in GRAPHS}


def options(precision="fp32", **kw) -> BuildOptions:
    return BuildOptions(model="tiny", out=Path("x"), precision=precision, **kw)


def room_for(peak: int) -> int:
    """The memory available at which a build plans with exactly ``peak`` bytes."""
    return int((peak + checkplan.BUDGET_RESERVE) / checkplan.BUDGET_SHARE) + 1


# A geometry where the check's memory is mostly the model's, not the libraries': one image's
# vision attention is 4 heads x 4128^2 scores (0.07 G), the text decoder 512 wide, 32k vocab.
SMALL = preset("tiny")
SMALL = MllamaConfig(
    vision=replace(
        SMALL.vision,
        hidden_size=128,
        num_heads=4,
        intermediate_size=256,
        output_dim=384,
        image_size=448,
        num_layers=2,
        num_global_layers=1,
        intermediate_layers=(0, 1),
    ),
    text=replace(
        SMALL.text,
        hidden_size=512,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=1024,
        vocab_size=32000,
        num_layers=3,
        cross_attention_layers=(1,),
    ),
    image_token_id=32000,
)


# -- the decision ------------------------------------------------------------------------------


def test_full_when_it_fits_reduced_when_only_the_copy_fits_refused_when_neither():
    config = SMALL
    full = estimate(config, "fp32", first_cases()).peak
    small = estimate(reduced_copy(config).config, "fp32", first_cases()).peak
    assert small < full
    plan = plan_check(options(), config, available=64 << 30)
    assert plan.depth == "full" and all(len(c) == 2 for c in plan.cases.values())
    plan = plan_check(options(), config, available=room_for(full) - 2)
    assert plan.depth == "reduced" and plan.config == reduced_copy(config).config
    with pytest.raises(MllamaExportError, match="even on a reduced copy"):
        plan_check(options(), config, available=room_for(small) - 2)
    with pytest.raises(MllamaExportError, match="--check-depth full needs"):
        plan_check(options(check_depth="full"), config, available=room_for(full) - 2)
    assert plan_check(options(check_depth="reduced"), config, 64 << 30).depth == "reduced"
    assert plan_check(options("bf16"), config, 1).depth == "none"  # no numeric check at all


def test_11b_on_this_machine_checks_a_reduced_copy():
    plan = plan_check(options("fp16"), preset("11b"), available=24 << 30)
    assert plan.depth == "reduced"
    # the copy's images have 2 tiles: six of them (the second case) fit in 24 GB
    assert [len(plan.cases[g]) for g in GRAPHS] == [2, 2, 2]
    tight = plan_check(options("fp16"), preset("11b"), available=18 << 30)
    assert [len(tight.cases[g]) for g in GRAPHS] == [1, 2, 2]  # six images' attention: too much
    assert plan.estimate.peak <= budget(24 << 30)
    assert "2 (self-attention), 3 (cross-attention) of 40" in plan.label()


def test_fp8_plans_its_check_as_fp16_and_calibration_apart():
    # calibration runs layer by layer (refused apart: tests/test_streaming.py); the check's
    # model is float16 outside its FP8 layers, so 11B here checks a reduced copy, as fp16 does
    assert plan_check(options("fp8"), preset("tiny"), 64 << 30).depth == "full"
    fp8, fp16 = (plan_check(options(p), preset("11b"), 24 << 30) for p in ("fp8", "fp16"))
    assert fp8.depth == fp16.depth == "reduced" and fp8.estimate == fp16.estimate


# -- the reduced copy --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "11b", "90b"])
def test_the_reduced_copy_is_smaller_than_the_model_and_keeps_every_kind_of_layer(name):
    full = preset(name)
    small = reduced_copy(full).config
    assert graph_sizes(small).total < graph_sizes(full).total / (2 if name == "tiny" else 10)
    t, v = small.text, small.vision
    assert (t.num_layers, len(t.cross_attention_layers)) == (2, 1)
    assert (v.num_layers, v.num_global_layers, v.max_num_tiles) == (1, 1, 2)
    assert (t.hidden_size, v.hidden_size) == (full.text.hidden_size, full.vision.hidden_size)


def test_the_reduced_copy_is_made_of_the_checkpoints_own_tensors(
    tiny_dir, tiny_model_meta, tmp_path
):
    config = MllamaConfig.from_hf_config(tiny_dir)
    copy = reduced_copy(config)
    folder = write_reduced_checkpoint(Checkpoint(tiny_dir, config), copy, tmp_path / "copy")
    small, full = load_model(folder).state_dict(), tiny_model_meta.state_dict()
    assert copy.source_layers == (0, 1)  # layer 1 is tiny's first cross-attention layer
    assert torch.equal(small["text.layers.1.cross_attn.q_proj.weight"],
                       full["text.layers.1.cross_attn.q_proj.weight"])  # fmt: skip
    tiles = full["vision.gated_positional_embedding.tile_embedding.weight"]
    kept = small["vision.gated_positional_embedding.tile_embedding.weight"]
    # aspect ratios (1, 1) and (1, 2), their first two tiles
    assert kept.shape == (3, tiles.shape[1] // 2) and torch.equal(kept, tiles[:3, : kept.shape[1]])
    assert torch.equal(small["text.embed_tokens.weight"], full["text.embed_tokens.weight"])


def test_a_copy_with_fewer_vocabulary_rows_keeps_the_image_rows(tmp_path):
    config = preset("tiny")
    config = replace(config, text=replace(config.text, vocab_size=600),
                     image_token_id=600)  # fmt: skip
    ckpt = write_checkpoint(config, tmp_path / "ckpt")
    checkplan_vocab = checkplan.REDUCED_VOCAB
    try:
        checkplan.REDUCED_VOCAB = 520
        copy = reduced_copy(config)
    finally:
        checkplan.REDUCED_VOCAB = checkplan_vocab
    folder = write_reduced_checkpoint(Checkpoint(ckpt, config), copy, tmp_path / "copy")
    small, full = load_model(folder), load_model(ckpt)
    assert copy.config.image_token_id == 520
    embed, original = small.text.embed_tokens.weight, full.text.embed_tokens.weight
    assert torch.equal(embed[:520], original[:520]) and torch.equal(embed[520:], original[600:])
    assert torch.equal(small.text.lm_head.weight, full.text.lm_head.weight[:520])


@pytest.mark.parametrize("name", ["11b", "90b"])
def test_the_copys_special_tokens_and_check_prompts_stay_inside_its_rows(name):
    # Llama 3's BOS, EOS and pad ids (128000 and up) lie past the copy's 4,096 rows: the FP8
    # check's prompts start with BOS, so at full size the copy must move them (a 2-layer 11B
    # FP8 build failed its check with "token ids outside 0..4103" before it did).
    full = preset(name).text
    copy = reduced_copy(preset(name)).config
    t = copy.text
    specials = [t.bos_token_id, *t.eos_token_ids, t.pad_token_id]
    assert all(0 <= i < t.vocab_size for i in specials)
    assert len(set(specials)) == len({full.bos_token_id, *full.eos_token_ids, full.pad_token_id})
    assert MllamaConfig.from_hf_dict(copy.to_hf_dict()) == copy
    for case in check_cases(copy, Limits(4, 512, 2)):
        assert all(0 <= i < t.embedding_rows for p in case.prompts for i in p)
        assert all(p[0] == t.bos_token_id for p in case.prompts)


def test_an_fp8_build_checks_a_copy_whose_vocabulary_lost_the_special_tokens(tmp_path, monkeypatch):
    # The full-size case in small: the copy keeps 300 of 600 rows, and tiny's BOS, EOS and pad
    # ids (500 and up) are not among them.
    config = preset("tiny")
    config = replace(config, text=replace(config.text, vocab_size=600),
                     image_token_id=600)  # fmt: skip
    ckpt = write_checkpoint(config, tmp_path / "ckpt")
    monkeypatch.setattr(checkplan, "REDUCED_VOCAB", 300)
    out = build(BuildOptions(model=str(ckpt), out=tmp_path / "art", precision="fp8",
                             check_depth="reduced"))  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        assert (
            graph["check"]["ran"] and "first 300 of 600 vocabulary rows" in graph["check"]["depth"]
        )


def test_a_reduced_check_runs_on_the_copy_and_the_artifacts_are_the_whole_model(tiny_dir, tmp_path):
    out = tmp_path / "art"
    build(BuildOptions(model=str(tiny_dir), out=out, check_depth="reduced"))
    manifest = json.loads((out / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        check = graph["check"]
        assert check["ran"] and "reduced copy at the real widths" in check["depth"]
        assert "text layers 0 (self-attention), 1 (cross-attention) of 6" in check["depth"]
        assert max(m["rel_l2"] for m in check["outputs"].values()) < 1e-4
    assert not any(p.name.startswith(".reduced") for p in out.rglob("*"))
    decode = onnx.load(str(out / "onnx/decode.onnx"), load_external_data=False)
    new_key = next(o for o in decode.graph.output if o.name == "new_key")
    assert new_key.type.tensor_type.shape.dim[0].dim_value == 4  # tiny's 4 self layers


# -- the estimate against measured peaks ------------------------------------------------------

CHILD = r"""
import sys
from pathlib import Path
from mllama_export.exporter import verify
from mllama_export.exporter.checkplan import CHECK_CASES
from mllama_export.exporter.options import BuildOptions
from mllama_export.exporter.streaming import StreamingExport
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.model import GRAPH_MODULES
from mllama_export.graphs.weights import Checkpoint, load_model

phase, ckpt, onnx_dir, precision = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
config = MllamaConfig.from_hf_config(ckpt)
options = BuildOptions(model=str(ckpt), out=Path("x"), precision=precision)
cases = {g: ((1, CHECK_CASES[0]),) for g in GRAPH_MODULES}
if phase == "export":
    onnx_dir.mkdir()
    StreamingExport(Checkpoint(ckpt, config), options).export_all(onnx_dir)
elif phase == "reference":
    reference = verify.Reference(lambda: load_model(ckpt, "meta", options.dtype))
    expected = verify.reference_outputs(reference, config, options, cases)
else:
    from mllama_export.engines.onnxrt import OnnxRuntimeBackend
    for name, cls in GRAPH_MODULES.items():
        backend = OnnxRuntimeBackend(onnx_dir / f"{name}.onnx", cls.INPUTS, cls.OUTPUTS)
        args = verify.inputs(cls, config, options.dtype, 1, CHECK_CASES[0])
        backend.infer({k: a.numpy() for k, a in args.items()})
        del backend
# VmHWM: this process's own peak; ru_maxrss would carry the parent's across fork and exec
status = Path("/proc/self/status").read_text()
print(int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024)
"""


def measured_peak(*args) -> int:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize(
    "precision, phases",
    [("fp16", ("export", "reference", "onnxruntime")), ("fp32", ("reference",))],
)
def test_the_estimate_is_within_its_tolerance_of_the_measured_peaks(tmp_path, precision, phases):
    """Each phase's estimate is at least 95% of its measured peak (the high-water mark of a
    child process running just that phase) and at most 135% of it: safe, and not wasteful.
    (fp32's ONNX Runtime phase is measured at the 11B width in docs/benchmarks.md.)"""
    ckpt = write_checkpoint(SMALL, tmp_path / "ckpt")
    onnx_dir = tmp_path / "onnx"
    predicted = estimate(SMALL, precision, first_cases())
    for phase in phases:
        peak = measured_peak(phase, ckpt, onnx_dir, precision)
        guess = getattr(predicted, phase)
        print(f"{precision} {phase}: estimate {guess / GB:.2f} GB, measured {peak / GB:.2f} GB")
        assert 0.95 * peak <= guess <= 1.35 * peak, (phase, guess / GB, peak / GB)
