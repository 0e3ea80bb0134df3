"""Our LLaVA graphs against transformers' LlavaForConditionalGeneration and
LlavaNextForConditionalGeneration, fp32, on checkpoints transformers saved itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llava_cases import (
    IMAGE_TOKEN,
    NEXT_PINPOINTS,
    REL_L2,
    built,
    greedy,
    hf_generate,
    hf_inputs,
    prefill_feed,
    random_tiles,
    rel_l2,
    torch_runner,
)

from mllama_export.graphs.llava_layout import image_token_count, select_best_resolution

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def case(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


def prompt(case, sizes, text_lengths, seed):
    """Token ids: text runs with each image's tokens between them, as the processor expands."""
    rng = np.random.default_rng(seed)
    ids = [1] + rng.integers(2, IMAGE_TOKEN, text_lengths[0]).tolist()
    for size, n in zip(sizes, text_lengths[1:], strict=True):
        ids += [IMAGE_TOKEN] * image_token_count(case.config, size)
        ids += rng.integers(2, IMAGE_TOKEN, n).tolist()
    return ids


def assert_prefill_matches(case, rows, image_sizes, seed=0):
    pixels = random_tiles(case.config, image_sizes, seed)
    batch, feed = prefill_feed(case.config, rows, image_sizes, pixels, torch_runner(case.ours))
    ours = torch_runner(case.ours)("prefill", feed)[0]
    with torch.no_grad():
        ref = case.hf(**hf_inputs(case.config, batch, pixels, image_sizes)).logits.numpy()
    real = batch["attention_mask"] != 0
    for b in range(len(rows)):
        for pos in np.flatnonzero(real[b]):
            err = rel_l2(ours[b, pos], ref[b, pos])
            assert err < REL_L2, f"row {b} position {pos}: relative L2 {err:.2e}"


SIZES = [(30, 70), (90, 33)]  # (height, width): landscape and portrait


def test_text_only(case):
    assert_prefill_matches(case, [prompt(case, [], [9], seed=1)], [[]])


def test_one_image(case):
    assert_prefill_matches(case, [prompt(case, SIZES[:1], [3, 5], seed=2)], [SIZES[:1]])


def test_two_images(case):
    rows = [prompt(case, SIZES, [2, 4, 3], seed=3)]
    assert_prefill_matches(case, rows, [SIZES])


def test_adjacent_images_share_one_run(case):
    rows = [prompt(case, SIZES, [2, 0, 3], seed=4)]
    assert_prefill_matches(case, rows, [SIZES])


def test_left_padded_batch_of_three(case):
    image_sizes = [[SIZES[0]], [], [SIZES[1], (45, 45)]]
    rows = [
        prompt(case, image_sizes[0], [1, 2], seed=5),
        prompt(case, [], [4], seed=6),
        prompt(case, image_sizes[2], [2, 1, 6], seed=7),
    ]
    assert_prefill_matches(case, rows, image_sizes, seed=8)


# (height, width) whose best resolution is each pinpoint, in NEXT_PINPOINTS' order
PINPOINT_IMAGES = [(90, 40), (40, 80), (100, 100), (20, 25), (17, 120)]


def test_every_pinpoint_is_the_best_for_one_image():
    chosen = [
        select_best_resolution(*s, [tuple(p) for p in NEXT_PINPOINTS]) for s in PINPOINT_IMAGES
    ]
    assert chosen == [tuple(p) for p in NEXT_PINPOINTS]


@pytest.mark.parametrize(
    "size", PINPOINT_IMAGES, ids=["portrait", "landscape", "square", "tiny", "very-wide"]
)
def test_anyres_pinpoints(tmp_path_factory, size):
    case = built("llava_next", tmp_path_factory)
    assert_prefill_matches(case, [prompt(case, [size], [2, 3], seed=9)], [[size]], seed=10)


def test_rope_frequencies_match_transformers(case):
    ref = case.hf.model.language_model.rotary_emb.inv_freq
    torch.testing.assert_close(case.ours.text.rotary.inv_freq, ref, rtol=1e-6, atol=0)


GENERATION = {
    "text-only": ([[]], [[6]]),
    "one-image": ([[SIZES[0]]], [[2, 3]]),
    "two-images": ([SIZES], [[1, 2, 2]]),
    "padded-batch-of-3": ([[SIZES[1]], [], [SIZES[0], (20, 25)]], [[3, 1], [7], [1, 2, 4]]),
}


def generation_inputs(case, name):
    image_sizes, lengths = GENERATION[name]
    rows = [
        prompt(case, s, n, seed=20 + i)
        for i, (s, n) in enumerate(zip(image_sizes, lengths, strict=True))
    ]
    return rows, image_sizes, random_tiles(case.config, image_sizes, seed=30)


@pytest.mark.parametrize("name", GENERATION)
def test_greedy_generation_matches_transformers(case, name):
    rows, image_sizes, pixels = generation_inputs(case, name)
    tokens, logits = greedy(case.config, rows, image_sizes, pixels, torch_runner(case.ours), 20)
    ref_tokens, ref_logits = hf_generate(case.hf, case.config, rows, image_sizes, pixels, 20)
    np.testing.assert_array_equal(tokens, ref_tokens)
    for step in range(20):
        for b in range(len(rows)):
            err = rel_l2(logits[step, b], ref_logits[step, b])
            assert err < REL_L2, f"step {step} row {b}: relative L2 {err:.2e}"


def test_sliding_window_is_shorter_than_the_prompts(tmp_path_factory):
    """Guards that the NeXT case exercises the window: without it, the logits differ."""
    case = built("llava_next", tmp_path_factory)
    window = case.config.text.sliding_window
    rows = [prompt(case, SIZES, [2, 4, 3], seed=2)]
    assert window is not None and len(rows[0]) > 3 * window
    pixels = random_tiles(case.config, [SIZES], 2)
    run = torch_runner(case.ours)
    _, feed = prefill_feed(case.config, rows, [SIZES], pixels, run)
    windowed = run("prefill", feed)[0]
    case.ours.text.window = 10**6
    try:
        unwindowed = run("prefill", feed)[0]
    finally:
        case.ours.text.window = window
    assert rel_l2(unwindowed[0, -1], windowed[0, -1]) > 1e-2
