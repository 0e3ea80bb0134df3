"""LLaVA through the generic runner (engines/runner.py), on our PyTorch graphs and on ONNX
Runtime over exported graphs: greedy tokens equal to transformers' generate, logits within
relative L2 1e-5 at every step, fp32; the input processor's refusals, one line each."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from llava_cases import (
    ARTIFACT_LIMITS,
    PAD,
    REL_L2,
    artifacts,
    built,
    hf_inputs,
    rel_l2,
)
from test_llava_reference import PINPOINT_IMAGES, generation_inputs, prompt

from mllama_export.engines.llava_preprocess import LlavaImages
from mllama_export.engines.llava_text import left_pad
from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.llava_layout import image_tiles

pytest.importorskip("transformers")

LIMITS = Limits(**ARTIFACT_LIMITS)
STEPS = 20
BACKENDS = ["torch", "onnxruntime", "onnxruntime-iobinding"]
CASES = ["text-only", "one-image", "two-images", "padded-batch-of-3"]


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def runners(kind, tmp_path_factory) -> dict[str, Runner]:
    case = built(kind, tmp_path_factory)
    folder = artifacts(kind, tmp_path_factory)
    return {
        "torch": Runner.from_model(case.ours, LIMITS),
        "onnxruntime": Runner.from_artifacts(folder),
        "onnxruntime-iobinding": Runner.from_artifacts(folder, io_binding=True),
    }


def as_images(config, image_sizes, pixels) -> LlavaImages | None:
    if not any(image_sizes):
        return None
    tiles = [[image_tiles(config, s) for s in row] for row in image_sizes]
    return LlavaImages(pixels, image_sizes, tiles)


@functools.cache
def _reference(hf, config, rows, image_sizes, pixels_bytes, shape):
    """transformers' greedy generate of exactly STEPS tokens: its end token is made one no
    logit can pick, so that it stops no row early, as the runner's empty stop set does."""
    pixels = np.frombuffer(pixels_bytes, np.float32).reshape(shape)
    batch = left_pad([list(r) for r in rows], PAD)
    inputs = hf_inputs(config, batch, pixels, [list(r) for r in image_sizes])
    with torch.no_grad():
        out = hf.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, pad_token_id=PAD,
            eos_token_id=config.text.vocab_size, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences[:, batch["input_ids"].shape[1] :].tolist(), torch.stack(out.logits).numpy()


def reference(case, rows, image_sizes, pixels):
    key = tuple(map(tuple, rows)), tuple(map(tuple, image_sizes))
    return _reference(case.hf, case.config, *key, pixels.tobytes(), pixels.shape)


def assert_generates_as_transformers(runner, case, rows, image_sizes, pixels):
    images = as_images(case.config, image_sizes, pixels)
    ours = runner.generate_ids(rows, images, STEPS, stop_tokens=set(), keep_logits=True)
    ref_tokens, ref_logits = reference(case, rows, image_sizes, pixels)
    assert ours.token_ids == ref_tokens
    steps = [ours.prefill_logits[:, -1], *ours.step_logits]
    assert len(steps) == STEPS
    for step, logits in enumerate(steps):
        for b in range(len(rows)):
            err = rel_l2(logits[b], ref_logits[step, b])
            assert err < REL_L2, f"step {step} row {b}: relative L2 {err:.2e}"
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_equals_transformers(runners, kind, backend, name, tmp_path_factory):
    case = built(kind, tmp_path_factory)
    rows, image_sizes, pixels = generation_inputs(case, name)
    ours = assert_generates_as_transformers(runners[backend], case, rows, image_sizes, pixels)
    assert ours.cache_bytes_per_step > 0
    if any(image_sizes):
        assert "vision_s" in ours.timings


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_next_images_of_every_pinpoint_in_one_batch(runners, backend, tmp_path_factory):
    """Portrait, landscape, square, tiny and very wide: each row's grid and unpadding."""
    case = built("llava_next", tmp_path_factory)
    runners = runners if case.config.is_next and runners["torch"].config.is_next else None
    if runners is None:
        pytest.skip("LLaVA-NeXT only (the llava row of the fixture)")
    image_sizes = [[s] for s in PINPOINT_IMAGES]
    rows = [prompt(case, s, [1 + i, 2], seed=60 + i) for i, s in enumerate(image_sizes)]
    rng = np.random.default_rng(61)
    v = case.config.vision
    n = sum(image_tiles(case.config, s) for row in image_sizes for s in row)
    pixels = rng.standard_normal((n, 3, v.image_size, v.image_size)).astype(np.float32)
    assert_generates_as_transformers(runners[backend], case, rows, image_sizes, pixels)
