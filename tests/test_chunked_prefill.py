"""Chunked prefill on ONNX Runtime: the prompt through the decode (step) graph N tokens at a time
gives one-shot prefill's logits (relative L2 below 1e-5, fp32) and transformers' greedy tokens,
with images before, at, inside and after a chunk boundary, left-padded batches (rows whose
whole chunk is padding) and text-only prompts; the same through the step graph with one
masked past slot (a shared text engine's prefill), through the CLI and through the gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import hf_generate, random_images, torch_runner

from mllama_export.cli import main
from mllama_export.engines.evalset import EvalCase
from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError
from mllama_export.validate.gate import run_gate

IMG = 512
NEW = 10
CHUNKS = (1, 7, 64)


def text(start: int, n: int) -> list[int]:
    return [20 + (start + i) % 400 for i in range(n)]


# Chunk boundaries fall at 7, 14, ... and 64, 128. Each image is a <|image|> token; the text
# after it sees that image up to the next one (the last image: to the end of the prompt).
CASES = {
    # an image early, in the first chunk of 7 and of 64; its span crosses every boundary
    "image-before-boundaries": ([[500, 20, IMG, *text(0, 77)]], [[6]]),
    # images exactly at boundaries: the first token of a 7-chunk and of the second 64-chunk
    "images-at-boundaries": ([[500, *text(1, 6), IMG, *text(2, 56), IMG, *text(3, 15)]], [[2, 5]]),
    # images inside chunks (not at an edge), the second in the last, shorter 64-chunk
    "images-inside-chunks": ([[500, *text(4, 9), IMG, *text(5, 60), IMG, 30, 31]], [[8, 1]]),
    # an image after every boundary but the last: only the final chunk sees it
    "image-after-boundaries": ([[500, *text(6, 70), IMG, 40, 41]], [[3]]),
    # left padding: rows 2 and 3 are padding for whole 7-chunks and the whole first 64-chunk
    "padded-batch": (
        [[500, IMG, *text(7, 78)], [500, IMG, IMG, 50, 51, 52], [500, *text(8, 9), IMG, 60]],
        [[6], [1, 4], [2]],
    ),
    "text-only": ([[500, *text(9, 70)], [500, *text(10, 11)]], None),
}


@pytest.fixture(scope="module")
def ort_runner(ort_artifacts) -> Runner:
    return Runner.from_artifacts(ort_artifacts)


@pytest.fixture(scope="module")
def one_shot(ort_runner, tiny_hf):
    """Per case: images, one-shot prefill's generation, and transformers' greedy tokens."""
    done = {}
    for name, (prompts, ratios) in CASES.items():
        images = random_images(ort_runner.config, ratios, seed=7) if ratios else None
        gen = ort_runner.generate_ids(prompts, images, NEW, stop_tokens=set(), keep_logits=True)
        done[name] = (images, gen, hf_generate(tiny_hf, ort_runner, prompts, images, NEW))
    return done


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_same_as_one_shot(gen, reference, expected_tokens):
    real = reference.prompt_mask != 0  # padding positions are garbage on both sides
    assert gen.prefill_logits.shape == reference.prefill_logits.shape
    err = rel_l2(gen.prefill_logits[real], reference.prefill_logits[real])
    assert err < 1e-5, f"prefill logits: relative L2 {err:.2e}"
    assert np.isfinite(gen.prefill_logits).all()  # padding rows too: no NaN from full masks
    for step, (a, b) in enumerate(zip(gen.step_logits, reference.step_logits, strict=True)):
        assert rel_l2(a, b) < 1e-5, f"decode step {step}"
    assert gen.token_ids == reference.token_ids == expected_tokens


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("case", CASES)
def test_chunked_prefill_equals_one_shot_prefill_and_transformers(
    ort_runner, one_shot, case, chunk
):
    prompts, _ = CASES[case]
    images, reference, expected = one_shot[case]
    gen = ort_runner.generate_ids(
        prompts, images, NEW, stop_tokens=set(), keep_logits=True, prefill_chunk=chunk
    )
    s = max(len(p) for p in prompts)
    assert gen.timings["prefill_calls"] == -(-s // chunk)
    assert_same_as_one_shot(gen, reference, expected)


def test_serving_chunks_ask_for_the_last_position_only(ort_artifacts):
    """Without keep_logits each chunk's lm_head runs on one row (logit_positions [n - 1])."""
    runner = Runner.from_artifacts(ort_artifacts)
    seen = []
    infer = runner.decode.infer
    runner.decode.infer = lambda feed: seen.append(feed) or infer(feed)
    runner.generate_ids([[500, *text(0, 19)]], None, 3, stop_tokens=set(), prefill_chunk=8)
    chunks, steps = seen[:3], seen[3:]
    assert [f["input_ids"].shape[1] for f in chunks] == [8, 8, 4]
    assert [f["logit_positions"].tolist() for f in chunks] == [[7], [7], [3]]
    cap = 20 + 3
    assert [f["attention_mask"].shape for f in chunks] == [(1, cap + 8), (1, cap + 8), (1, cap + 4)]
    assert chunks[2]["attention_mask"][0, :16].tolist() == [1] * 16  # the earlier chunks' slots
    assert chunks[2]["attention_mask"][0, 16:cap].tolist() == [0] * (cap - 16)
    assert [f["input_ids"].shape[1] for f in steps] == [1, 1]
    assert steps[0]["attention_mask"].shape == (1, cap + 1)


def test_the_step_graph_prefills_a_whole_prompt_against_one_masked_slot(ort_artifacts, one_shot):
    """What a shared text engine does (no prefill engine): the same logits and tokens."""
    runner = Runner.from_artifacts(ort_artifacts)
    runner.prefill = None
    for case in ("padded-batch", "images-at-boundaries"):
        prompts, _ = CASES[case]
        images, reference, expected = one_shot[case]
        gen = runner.generate_ids(prompts, images, NEW, stop_tokens=set(), keep_logits=True)
        assert gen.timings["prefill_calls"] == 1
        assert_same_as_one_shot(gen, reference, expected)


class _AtMost:
    """A step backend that takes at most `n` new tokens per call, as a TensorRT engine's
    profiles allow (max_step_tokens), and records the calls."""

    def __init__(self, backend, n):
        self.backend, self.max_step_tokens, self.calls = backend, n, []
        self.name, self.inputs, self.outputs = backend.name, backend.inputs, backend.outputs

    def infer(self, feed):
        self.calls.append((feed["input_ids"].shape[1], feed["past_key"].shape[3]))
        assert self.calls[-1][0] <= self.max_step_tokens
        return self.backend.infer(feed)


def test_without_a_prefill_graph_longer_prompts_go_in_the_engines_largest_chunks(
    ort_artifacts, one_shot
):
    runner = Runner.from_artifacts(ort_artifacts)
    runner.prefill, runner.decode = None, _AtMost(runner.decode, 32)
    prompts, _ = CASES["padded-batch"]
    images, reference, expected = one_shot["padded-batch"]
    gen = runner.generate_ids(prompts, images, NEW, stop_tokens=set(), keep_logits=True)
    cap = 80 + NEW
    assert runner.decode.calls[:3] == [(32, cap), (32, cap), (16, cap)]  # then decode steps
    assert set(runner.decode.calls[3:]) == {(1, cap)}
    assert_same_as_one_shot(gen, reference, expected)
    short = runner.generate_ids([[500, 1, 2]], None, 2, stop_tokens=set())
    assert runner.decode.calls[-2] == (3, 1) and short.timings["prefill_calls"] == 1
    with pytest.raises(MllamaExportError, match=r"takes at most 32 new token\(s\).*1\.\.32"):
        runner.generate_ids(prompts, images, 2, prefill_chunk=33)


@pytest.mark.parametrize("chunk", [0, -3, True, 2.5, "8"])
def test_a_bad_prefill_chunk_is_refused_before_any_work(ort_runner, chunk):
    with pytest.raises(MllamaExportError, match="prefill_chunk .*positive number"):
        ort_runner.generate_ids([[500, 1, 2]], None, 2, prefill_chunk=chunk)


def test_meta_semantics_chunked_in_pytorch(tiny_model_meta):
    """Meta's mask zeroes the cross-attention of text before an image: per chunk row too."""
    runner = torch_runner(tiny_model_meta)
    prompts, ratios = CASES["padded-batch"]
    images = random_images(runner.config, ratios, seed=9)
    kw = dict(max_new_tokens=6, stop_tokens=set(), keep_logits=True)
    reference = runner.generate_ids(prompts, images, **kw)
    for chunk in (3, 64):
        gen = runner.generate_ids(prompts, images, prefill_chunk=chunk, **kw)
        assert_same_as_one_shot(gen, reference, reference.token_ids)


def test_run_prefill_chunk_on_the_command_line(ort_artifacts, ort_runner):
    ids = [500, *text(3, 30)]
    args = ["run", str(ort_artifacts), "--token-ids", ",".join(map(str, ids))]
    args += ["--max-new-tokens", "6", "--json"]
    plain = CliRunner().invoke(main, args)
    chunked = CliRunner().invoke(main, [*args, "--prefill-chunk", "7"])
    assert plain.exit_code == chunked.exit_code == 0, chunked.output
    assert json.loads(chunked.output)["token_ids"] == json.loads(plain.output)["token_ids"]
    assert json.loads(chunked.output)["timings"]["prefill_calls"] == 5
    bad = CliRunner().invoke(main, [*args, "--prefill-chunk", "0"])
    assert bad.exit_code == 2 and "--prefill-chunk" in bad.output
    plain = ort_runner.generate("Describe the picture", max_new_tokens=4)
    chunked = ort_runner.generate("Describe the picture", max_new_tokens=4, prefill_chunk=2)
    assert (chunked.token_ids, chunked.text) == (plain.token_ids, plain.text)
    streamed = ort_runner.stream("Describe the picture", max_new_tokens=4, prefill_chunk=2)
    assert "".join(streamed) == plain.text


def test_the_gate_judges_chunked_prefill(ort_artifacts):
    cases = [
        EvalCase("text", [[500, *text(0, 20)], [500, *text(1, 5)]]),
        EvalCase("image", CASES["images-at-boundaries"][0], random_images(
            Runner.from_artifacts(ort_artifacts).config, [[2, 5]], seed=3
        )),
    ]  # fmt: skip
    report = run_gate(ort_artifacts, cases=cases, steps=2, prefill_chunk=7)
    assert report.passed, report.summary_line()
    assert report.extra["prefill_chunk"] == 7
    prefill = [r for r in report.results if r.stage == "prefill"]
    assert len(prefill) == 2 and max(r.metrics.rel_l2 for r in prefill) < 1e-5
    shown = CliRunner().invoke(main, ["validate", "--help"])
    assert "--prefill-chunk" in shown.output
    assert "--prefill-chunk" in CliRunner().invoke(main, ["sensitivity", "--help"]).output
