"""The planner against hand calculations and against the parameters the model really has."""

from __future__ import annotations

import functools

import pytest
import torch
from click.testing import CliRunner

from mllama_export.cli import main
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.fits import DEFAULTS, fitting
from mllama_export.exporter.plan import (
    count_params,
    format_plan,
    plan,
)
from mllama_export.graphs.config import preset
from mllama_export.graphs.model import MllamaModel

H100_BW = 3.35e12


@functools.cache
def meta_counts(name: str) -> dict[str, int]:
    """Parameter counts of the instantiated model (meta device: no memory), grouped by owner."""
    with torch.device("meta"):
        model = MllamaModel(preset(name))
    groups = dict.fromkeys(
        ["vision_tower", "projector", "cross_kv", "cross_k_norm", "embedding", "lm_head"], 0
    )
    groups |= {"decoder_linear": 0, "decoder_other": 0}
    for full, param in model.named_parameters():
        n = param.numel()
        if full.startswith("vision."):
            key = "vision_tower"
        elif full.startswith("projector."):
            key = "projector"
        elif ".cross_attn.k_proj." in full or ".cross_attn.v_proj." in full:
            key = "cross_kv"
        elif ".cross_attn.k_norm." in full:
            key = "cross_k_norm"
        elif full.startswith("text.embed_tokens."):
            key = "embedding"
        elif full.startswith("text.lm_head."):
            key = "lm_head"
        elif full.endswith("_proj.weight"):  # q/k/v/o and gate/up/down of the decoder layers
            key = "decoder_linear"
        else:
            key = "decoder_other"
        groups[key] += n
    groups["total"] = sum(groups.values())
    return groups


@pytest.mark.parametrize("name", ["tiny", "11b", "90b"])
def test_parameter_counts_match_the_instantiated_model(name):
    counts, exact = count_params(preset(name)), meta_counts(name)
    for key, value in exact.items():
        assert getattr(counts, key) == value, key


def test_11b_by_hand():
    d, h, kv, dh, inter, vocab = 4096, 32, 8, 128, 14336, 128256
    n_self, n_cross = 32, 8
    attn = 2 * d * h * dh + 2 * d * kv * dh  # q, o + k, v
    mlp = 3 * d * inter
    self_layer = attn + mlp + 2 * d  # + two RMSNorms
    cross_layer = 2 * d * h * dh + mlp + 2 * d + dh + 2  # q, o, mlp, norms, q_norm, two gates
    assert (self_layer, cross_layer) == (218_112_000, 209_723_522)
    lm_head = vocab * d  # 525_336_576
    read = n_self * self_layer + n_cross * cross_layer + d + lm_head  # no embedding table
    assert read == 9_182_712_848
    image_tokens = 4 * 1601  # one image, 4 tiles of 40 x 40 patches + class token
    cross_cache = n_cross * 2 * kv * image_tokens * dh * 2  # 209.8 MB
    bf16 = 2 * read + cross_cache
    assert bf16 == pytest.approx(18.6e9, rel=0.01)
    assert bf16 / H100_BW == pytest.approx(5.5e-3, rel=0.02)
    linear = n_self * (attn + mlp) + n_cross * (2 * d * h * dh + mlp)
    fp8 = linear + 2 * (read - linear) + cross_cache
    assert fp8 == pytest.approx(9.9e9, rel=0.01)
    assert fp8 / H100_BW == pytest.approx(3.0e-3, rel=0.02)

    p16 = plan(preset("11b"), "bf16", max_batch=1, max_seq_len=8192, max_images=1)
    p8 = plan(preset("11b"), "fp8", max_batch=1, max_seq_len=8192, max_images=1)
    # The planner's floor is exact: hand figure + the one K/V row the step writes.
    step_row = n_self * 2 * kv * dh * 2
    assert p16.decode_floor_bytes == bf16 + step_row
    assert p8.decode_floor_bytes == fp8 + step_row
    assert p16.decode_floor_seconds == pytest.approx(5.5e-3, rel=0.03)
    assert p8.decode_floor_seconds == pytest.approx(3.0e-3, rel=0.03)
    # Profile maxima: self cache 32 x 2 x 8 x 8192 x 128 x 2 bytes = 1.07 GB.
    assert p16.self_cache_bytes == n_self * 2 * kv * 8192 * dh * 2 == 1_073_741_824
    assert p16.cross_cache_bytes == cross_cache
    assert p16.decode_ceiling_bytes == bf16 + step_row * 8193
    assert p16.fits and p8.fits
    assert p8.total_bytes < p16.total_bytes < 45e9


def test_90b_by_hand():
    d, h, kv, dh, inter, vocab = 8192, 64, 8, 128, 28672, 128256
    n_self, n_cross = 80, 20
    attn = 2 * d * h * dh + 2 * d * kv * dh
    mlp = 3 * d * inter
    self_layer = attn + mlp + 2 * d
    cross_layer = 2 * d * h * dh + mlp + 2 * d + dh + 2
    read = n_self * self_layer + n_cross * cross_layer + d + vocab * d
    linear = n_self * (attn + mlp) + n_cross * (2 * d * h * dh + mlp)
    image_tokens = 4 * 1601
    cross_cache = n_cross * 2 * kv * image_tokens * dh * 2
    bf16 = 2 * read + cross_cache
    fp8 = linear + 2 * (read - linear) + cross_cache
    assert bf16 == pytest.approx(173.1e9, rel=0.005)  # 51.7 ms at 3.35 TB/s
    assert fp8 == pytest.approx(87.9e9, rel=0.005)  # 26.2 ms
    p16 = plan(preset("90b"), "bf16", 1, 8192, 1)
    p8 = plan(preset("90b"), "fp8", 1, 8192, 1)
    step_row = n_self * 2 * kv * dh * 2
    assert p16.decode_floor_bytes == bf16 + step_row
    assert p8.decode_floor_bytes == fp8 + step_row
    assert p16.decode_floor_seconds == pytest.approx(bf16 / H100_BW, rel=1e-3)
    # Whole model: ~177 GB in bf16, ~92 GB with FP8 linears; neither fits one H100 once,
    # and prefill and decode hold a copy of the text weights each.
    total_params = meta_counts("90b")["total"]
    assert p16.vision.weight_bytes + p16.prefill.weight_bytes == 2 * total_params
    assert 2 * total_params == pytest.approx(177e9, rel=0.01)
    assert p8.vision.weight_bytes + p8.prefill.weight_bytes == pytest.approx(91.6e9, rel=0.01)
    assert p8.weight_bytes == pytest.approx(181.1e9, rel=0.01)
    assert not p16.fits and not p8.fits
    # Two copies of 90B's FP8 text weights (2 x 89.7 GB) are over one H200's 141 GB too.
    assert not plan(preset("90b"), "fp8", 1, 8192, 1, gpu="h200").fits


def test_each_engine_holds_its_weights_and_the_contexts_share_one_scratch():
    """Prefill and decode are two TensorRT engines: each holds the text weights. The three
    execution contexts run one after another in one user-managed buffer: the largest one."""
    p = plan(preset("11b"), "bf16", 1, 4096, 1)
    c = count_params(preset("11b"))
    assert p.decode.weight_bytes == p.prefill.weight_bytes == 2 * c.text_engine
    assert p.weight_bytes == p.vision.weight_bytes + 2 * p.prefill.weight_bytes
    assert p.weight_bytes == 2 * (meta_counts("11b")["total"] + c.text_engine)
    assert p.scratch_bytes == max(e.activation_bytes for e in p.engines)
    assert p.output_bytes == p.prefill.output_bytes
    assert p.total_bytes == (
        p.weight_bytes + p.self_cache_bytes + p.cross_cache_bytes + p.scratch_bytes + p.output_bytes
    )


def test_11b_batch_4_at_8k_holds_the_last_positions_logits_only():
    """The documented 11B setting: before, prefill returned [4, 8192, 128256] float32 logits
    (16.8 GB) for a serving path that reads one row; now [4, 1, 128256] (2 MB)."""
    p = plan(preset("11b"), "bf16", 4, 8192, 2)
    vocab, b, s = 128256, 4, 8192
    n_self, kv_row = 32, 2 * 8 * 128 * 2
    present = n_self * b * s * kv_row  # prefill's present K/V, copied into the cache
    assert p.prefill.output_bytes == b * vocab * 4 + present
    per_token = 2 * 4096 + (32 + 16) * 128 + 32 * 128 + 2 * 14336
    assert p.prefill.activation_bytes == b * s * per_token * 2  # no logits in it
    old_logits = b * s * vocab * 4
    assert old_logits == pytest.approx(16.8e9, rel=0.01)
    # what the engines really held before: both text copies, three scratches summed and
    # every position's logits
    before = (
        p.weight_bytes
        + p.self_cache_bytes
        + p.cross_cache_bytes
        + sum(e.activation_bytes for e in p.engines)
        + old_logits
        + b * vocab * 4
    )
    assert before == pytest.approx(69.8e9, rel=0.01)
    assert p.total_bytes == pytest.approx(54.2e9, rel=0.01)
    assert before - p.total_bytes > old_logits - present


def test_fp8_keeps_vision_embeddings_lm_head_and_norms_in_16_bit():
    c = count_params(preset("11b"))
    p = plan(preset("11b"), "fp8", 1, 1024, 1)
    assert p.vision.weight_bytes == 2 * (c.vision_tower + c.projector + c.cross_k_norm) + c.cross_kv
    assert p.prefill.weight_bytes == (
        2 * (c.embedding + c.lm_head + c.decoder_other) + c.decoder_linear
    )
    assert plan(preset("11b"), "fp16", 1, 1024, 1).weight_bytes == 2 * (c.total + c.text_engine)


def test_caches_and_time_scale_with_the_profile():
    small = plan(preset("11b"), "bf16", 1, 2048, 1)
    big = plan(preset("11b"), "bf16", 4, 8192, 2)
    assert big.self_cache_bytes == 16 * small.self_cache_bytes
    assert big.cross_cache_bytes == 8 * small.cross_cache_bytes
    # Batch 4 reads the weights once per step: far less than 4x the bytes.
    assert big.decode_floor_bytes < 1.2 * small.decode_floor_bytes
    # Fewer tiles and a shorter prompt mean less work.
    short = plan(preset("11b"), "bf16", 1, 8192, 1, prompt_len=512, tiles=1)
    full = plan(preset("11b"), "bf16", 1, 8192, 1)
    assert short.prefill.seconds < full.prefill.seconds / 10
    assert short.vision.seconds < full.vision.seconds / 3
    assert plan(preset("11b"), "bf16", 1, 8192, 1, gpu="h200").decode_floor_seconds < (
        full.decode_floor_seconds * 3.35 / 4.8 * 1.001
    )


def test_format_plan_and_the_plan_command(tiny_dir, ort_artifacts):
    text = format_plan(plan(preset("90b"), "bf16", 1, 8192, 1))
    for word in ("vision", "prefill", "decode", "does NOT fit", "H100 SXM"):
        assert word in text
    fits = invoke("plan", "--model", "11b", "--precision", "fp8", "--max-seq-len", 8192)
    assert fits.exit_code == 0 and "fits" in fits.output
    folder = invoke("plan", "--model", tiny_dir, "--precision", "bf16", "--prompt-len", 100)
    assert folder.exit_code == 0 and f"model {tiny_dir}" in folder.output
    missing = invoke("plan", "--model", "/no/such/folder")
    assert missing.exit_code == 2 and "tiny, 11b, 90b" in missing.output


def test_plan_takes_builds_defaults_and_precisions():
    """`plan` answers for what `build` builds: the same defaults, fp32 included."""
    build_params = {p.name: p for p in main.commands["build"].params}
    for name, value in DEFAULTS.items():
        assert build_params[name].default == value
        shown = "512; LLaVA: room for --max-images" if value is None else f"{value}]"
        assert f"else build's default{':' if value is None else ''} {shown}" in _help("plan")
    assert build_params["precision"].type.choices == main.commands["plan"].params[1].type.choices
    fp32, bf16 = (plan(preset("11b"), p, 4, 512, 2) for p in ("fp32", "bf16"))
    assert fp32.weight_bytes == 2 * bf16.weight_bytes
    assert fp32.self_cache_bytes == 2 * bf16.self_cache_bytes


def test_plan_of_an_artifact_folder_reads_its_manifest(ort_artifacts):
    result = invoke("plan", "--model", ort_artifacts)
    assert result.exit_code == 0, result.output
    # the artifacts were built for batch 4, 512 tokens, 2 images in fp32
    assert "precision fp32" in result.output and "batch 4, seq 512, images 2" in result.output
    result = invoke("plan", "--model", ort_artifacts, "--max-batch", 2)
    assert "batch 2, seq 512" in result.output


def test_a_plan_that_does_not_fit_says_what_would_and_exits_1():
    result = invoke("plan", "--model", "11b", "--precision", "bf16", "--max-batch", 16,
                    "--max-seq-len", 8192, "--max-images", 1)  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "does NOT fit" in result.output
    ways = result.output.split("what would fit, each alone: ")[1]
    assert "--max-seq-len" in ways and "--max-batch" in ways and "--gpu h200" in ways
    assert "--precision fp8" in ways
    batch = int(ways.split("--max-batch ")[1].split()[0])
    assert plan(preset("11b"), "bf16", batch, 8192, 1).fits
    assert not plan(preset("11b"), "bf16", batch + 1, 8192, 1).fits
    big = invoke("plan", "--model", "90b", "--precision", "bf16", "--max-batch", 1, "--gpu", "h200")
    # fp8 alone is no way out: two text engines hold 2 x 89 GB (docs/scaling.md)
    assert big.exit_code == 1 and "--precision fp8" not in big.output
    assert "x H200 SXM with tensor parallelism" in big.output


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _help(command: str) -> str:
    return " ".join(invoke(command, "--help").output.split())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "int4"}, "fp32, fp16, bf16, fp8"),
        ({"gpu": "a100"}, "h100, h200"),
        ({"max_batch": 0}, "max_batch must be a positive integer"),
        ({"max_seq_len": -5}, "max_seq_len must be a positive integer"),
        ({"max_images": 0}, "max_images must be a positive integer"),
        ({"max_batch": True}, "max_batch must be a positive integer"),
        ({"prompt_len": 0}, "prompt_len must be a positive integer"),
        ({"prompt_len": 9000}, r"expected 1\.\.8192"),
        ({"tiles": 5}, r"expected 1\.\.4"),
        ({"tiles": -1}, "tiles must be a positive integer"),
        ({"max_seq_len": 10**6}, r"expected 1\.\.131072"),
    ],
)
def test_invalid_inputs_name_what_is_allowed(kwargs, message):
    args = {"precision": "bf16", "max_batch": 1, "max_seq_len": 8192, "max_images": 1} | kwargs
    with pytest.raises(MllamaExportError, match=message):
        plan(preset("11b"), **args)


# -- one text engine or two ---------------------------------------------------------------------


def test_a_shared_text_engine_holds_the_text_weights_once():
    c = count_params(preset("11b"))
    split = plan(preset("11b"), "bf16", 1, 8192, 1)
    shared = plan(preset("11b"), "bf16", 1, 8192, 1, text_engine="shared")
    text = 2 * c.text_engine
    assert split.weight_bytes - shared.weight_bytes == text == pytest.approx(19.42e9, rel=1e-3)
    assert shared.prefill.weight_bytes == 0 and shared.decode.weight_bytes == text
    # its prefill takes at most 1024 new tokens a call: 8 chunks of an 8192-token prompt
    n, s, b, h = 1024, 8192, 1, 32
    assert shared.step_tokens == n and split.step_tokens is None
    per_token = 2 * 4096 + (32 + 16) * 128 + 32 * 128 + 2 * 14336
    assert shared.prefill.activation_bytes == b * n * per_token * 2 + b * h * n * (s + n) * 4
    kv_row = 2 * 8 * 128 * 2
    assert shared.prefill.output_bytes == b * 128256 * 4 + 32 * b * n * kv_row
    assert "in 8 call(s) of the decode engine" in shared.prefill.roofline_at
    # the decode step is the same either way
    assert shared.decode.seconds == split.decode.seconds
    assert shared.decode_floor_bytes == split.decode_floor_bytes
    assert shared.total_bytes == (
        shared.weight_bytes + shared.self_cache_bytes + shared.cross_cache_bytes
        + shared.scratch_bytes + shared.output_bytes
    )  # fmt: skip
    text_out = format_plan(shared)
    assert "text engine shared" in text_out and "(decode)" in text_out
    with pytest.raises(MllamaExportError, match="unknown text engine 'both'"):
        plan(preset("11b"), "bf16", 1, 8192, 1, text_engine="both")


def test_90b_fp8_fits_one_h200_with_one_text_engine_only():
    """docs/scaling.md: 2.19 GB vision + 89.43 GB text, once, + caches, scratch and outputs."""
    split = plan(preset("90b"), "fp8", 1, 8192, 1, gpu="h200")
    shared = plan(preset("90b"), "fp8", 1, 8192, 1, gpu="h200", text_engine="shared")
    assert not split.fits and shared.fits
    assert split.total_bytes == pytest.approx(188.46e9, rel=1e-3)
    assert shared.total_bytes == pytest.approx(97.77e9, rel=1e-3)
    assert shared.weight_bytes == pytest.approx(91.62e9, rel=1e-3)
    assert shared.free_bytes == pytest.approx(43.2e9, rel=1e-2)
    # scores of a 1024-token chunk against an 8192-slot cache: 1 x 64 x 1024 x 9216 float32
    assert shared.scratch_bytes > 64 * 1024 * 9216 * 4 == pytest.approx(2.42e9, rel=1e-2)


def test_the_plan_command_says_which_text_engine_fits():
    args = ["plan", "--model", "90b", "--precision", "fp8", "--gpu", "h200", "--max-batch", "1"]
    args += ["--max-seq-len", "8192", "--max-images", "1"]
    shared = CliRunner().invoke(main, [*args, "--text-engine", "shared"])
    split = CliRunner().invoke(main, [*args, "--text-engine", "split"])
    assert (shared.exit_code, split.exit_code) == (0, 1), shared.output
    assert "what would fit, each alone: --text-engine shared (97.8 GB)" in split.output
    assert "memory: 97.77 GB of 141 GB -> fits" in shared.output
    assert "memory: 188.46 GB of 141 GB -> does NOT fit" in split.output
    for out in (shared.output, split.output):  # both engines side by side, either way
        assert "split    188.46 GB, does NOT fit" in out and "shared    97.77 GB, fits" in out


def test_11b_bf16_batch_and_sequence_limits_on_one_h100():
    """What one text engine buys at 8192 tokens: memory for more than twice the batch. The
    stacked self-attention cache [32, B, 8, 8192, 128] passes TensorRT's per-tensor cap at
    batch 8 either way, so engines stop at 7 (ONNX Runtime has no such cap)."""
    config = preset("11b")
    split = fitting(config, "bf16", 1, 8192, 1, "h100", "split")
    shared = fitting(config, "bf16", 1, 8192, 1, "h100", "shared")
    assert (split.batch, shared.batch) == (12, 34)
    assert split.batch_cap == shared.batch_cap == 7
    for f in (split, shared):  # the limits found are the edge: one more does not fit
        engine = f.text_engine
        assert plan(config, "bf16", f.batch, 8192, 1, text_engine=engine).fits
        assert not plan(config, "bf16", f.batch + 1, 8192, 1, text_engine=engine).fits
    assert split.seq_len < shared.seq_len == config.text.max_position_embeddings
    assert not plan(config, "bf16", 1, split.seq_len + 1, 1).fits
    assert split.seq_len_cap == shared.seq_len_cap == 65535  # [32, 1, 8, S, 128] < 2^31
