"""LLaVA's planner: parameter counts against the models themselves and the published sizes,
memory by hand, and `mllama-export plan` for the 7B, 13B and 34B presets."""

from __future__ import annotations

import functools

import pytest
import torch
from click.testing import CliRunner

from mllama_export.cli import main
from mllama_export.exporter.llava_plan import count_params, plan, weight_bytes
from mllama_export.graphs.family import family_named
from mllama_export.graphs.llava_model import LlavaModel
from mllama_export.graphs.llava_presets import PRESETS, llava_preset


@functools.cache
def hf_count(name: str) -> int:
    """Parameters of transformers' model of the preset (meta device: no memory)."""
    import transformers

    raw = PRESETS[name]
    kind = {"llava": "Llava", "llava_next": "LlavaNext"}[raw["model_type"]]
    config = getattr(transformers, f"{kind}Config").from_dict(raw)
    with torch.device("meta"):
        model = getattr(transformers, f"{kind}ForConditionalGeneration")(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["llava-tiny", "llava-next-tiny", "llava-1.5-7b"])
def test_counts_match_our_model_and_transformers(name):
    config, counts = llava_preset(name), count_params(llava_preset(name))
    with torch.device("meta"):
        ours = sum(p.numel() for p in LlavaModel(config).parameters())
    assert counts.graphs == ours
    pytest.importorskip("transformers")
    assert counts.checkpoint == hf_count(name)


@pytest.mark.parametrize(
    "name, published",
    # the llava-hf model cards' sizes (safetensors parameters)
    [("llava-1.5-7b", 7.06e9), ("llava-next-mistral-7b", 7.57e9), ("llava-next-34b", 34.8e9)],
)
def test_parameter_counts_are_the_published_ones(name, published):
    assert count_params(llava_preset(name)).checkpoint == pytest.approx(published, rel=0.01)


def test_7b_memory_by_hand():
    r = plan(llava_preset("llava-1.5-7b"), "fp16", 4, 4096, 2)
    assert r.kv_per_token == 32 * 2 * 32 * 128 * 2 == 524_288  # 32 layers, 32 KV heads
    assert r.kv_cache == 4 * 4096 * 524_288
    assert r.features == 4 * 2 * 576 * 4096 * 2  # two 1-tile images per row, as prefill takes them
    p = r.params
    assert r.weights["prefill"] == r.weights["decode"] == 2 * p.text_engine
    assert r.weights["vision"] == 2 * p.vision_engine
    vision8, text8 = weight_bytes(p, "fp8")
    assert text8 == 2 * (p.text_engine - p.decoder_linear) + p.decoder_linear
    assert vision8 == r.weights["vision"]  # the tower and projector stay 16-bit
    assert r.total == sum(r.weights.values()) + r.kv_cache + r.features + r.outputs + max(
        r.scratch.values()
    )
    assert r.fits and r.decode_floor_bytes == 2 * (p.text_engine - p.embedding) + 4 * 524_288
    next_r = plan(llava_preset("llava-next-mistral-7b"), "bf16", 1, 8192, 1)
    assert next_r.kv_per_token == 32 * 2 * 8 * 128 * 2  # Mistral's 8 KV heads
    assert next_r.features == 5 * 576 * 4096 * 2  # one image of 1 + 4 tiles


def run_plan(*args: str):
    return CliRunner().invoke(main, ["plan", *args])


# 13B at batch 4 is 1.6 GB over an H100 (its text weights twice, 26 GB each): batch 2; two
# NeXT images take up to 2 x 2,928 tokens: 8192
@pytest.mark.parametrize(
    "name, batch, seq",
    [("llava-1.5-7b", "4", "4096"), ("llava-1.5-13b", "2", "4096"),
     ("llava-next-mistral-7b", "4", "8192")],
)  # fmt: skip
def test_the_plan_command_for_the_presets(name, batch, seq):
    args = ("--max-seq-len", seq, "--precision", "bf16", "--max-batch", batch)
    result = run_plan("--model", name, *args)
    assert result.exit_code == 0, result.output
    assert "fits" in result.output and f"model {name}: " in result.output
    assert "KV cache" in result.output and "image tokens: at most" in result.output


def test_34b_in_bf16_does_not_fit_an_h100_and_says_what_would():
    # Yi-34B's 4,096 positions hold one NeXT image of up to 2,928 tokens
    args = ("--model", "llava-next-34b", "--max-seq-len", "4096", "--max-images", "1")
    result = run_plan(*args, "--max-batch", "1", "--precision", "bf16")
    assert result.exit_code == 1, result.output
    assert "does NOT fit" in result.output
    ways = result.output.splitlines()[-1]
    assert ways.startswith("what would fit, each alone: ") and "--precision fp8" in ways
    assert "--gpu h200" not in ways  # 2 x 68 GB of text weights: over 141 GB too
    fp8 = run_plan(*args, "--max-batch", "1", "--precision", "fp8")
    assert fp8.exit_code == 0, fp8.output


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--max-seq-len", "512"],
            "max_seq_len 512 cannot hold 2 image(s) of llava-1.5-7b (576 tokens each at most)",
        ),
        (["--max-seq-len", "8192"], "exceeds llava-1.5-7b's max_position_embeddings 4096"),
        (["--max-seq-len", "2000", "--text-engine", "shared"], "LLaVA has no shared text engine"),
        (["--max-seq-len", "2000", "--tiles", "2"], "at most 1 tile(s); expected 1..1"),
        (["--max-seq-len", "2000", "--prompt-len", "2001"], "prompt_len 2001 exceeds"),
    ],
)
def test_refusals_are_one_line(args, message):
    result = run_plan("--model", "llava-1.5-7b", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_the_default_sequence_holds_the_images():
    """build's default max_seq_len for LLaVA: --max-images of the largest images and 256 tokens
    of text, in steps of 512, within the positions (exporter/llava_build.py)."""
    assert "batch 4, seq 1536, images 2" in run_plan("--model", "llava-1.5-7b").output
    one = run_plan("--model", "llava-1.5-7b", "--max-images", "1").output
    assert "batch 4, seq 1024, images 1" in one
    assert "seq 6144, images 2" in run_plan("--model", "llava-next-mistral-7b").output
    # 2 x 2928 image tokens do not fit 4096 positions: the way out is fewer images
    short = run_plan("--model", "llava-next-34b")
    assert short.exit_code == 2
    assert "max_seq_len 4096 cannot hold 2 image(s)" in short.output
    assert "expected --max-images 1 at most (its 4096 positions hold no more)" in short.output
    assert "seq 3584, images 1" in run_plan("--model", "llava-next-34b", "--max-images", "1").output


def test_the_family_names_its_planner():
    assert family_named("llava").part("plan").plan_text is not None
