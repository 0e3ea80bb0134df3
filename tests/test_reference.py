"""Our PyTorch graphs against transformers' MllamaForConditionalGeneration (hf semantics, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_generate, hf_inputs, random_images, torch_runner

from mllama_export.engines.inputs import prompt_feed

REL_L2 = 1e-5


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference_logits(hf, runner, prompts, images):
    with torch.no_grad():
        return hf(**hf_inputs(runner, prompts, images)).logits.numpy()


def our_logits(runner, prompts, images):
    return runner.generate_ids(prompts, images, max_new_tokens=1, keep_logits=True).prefill_logits


def assert_logits_match(tiny_hf, tiny_model, prompts, images):
    runner = torch_runner(tiny_model)
    feed = prompt_feed(runner.config, prompts, images)
    ours, ref = (
        our_logits(runner, prompts, images),
        reference_logits(tiny_hf, runner, prompts, images),
    )
    real = feed["attention_mask"] != 0  # padding rows are garbage on both sides
    for row in range(len(prompts)):
        for pos in np.flatnonzero(real[row]):
            err = rel_l2(ours[row, pos], ref[row, pos])
            assert err < REL_L2, f"prompt {row} position {pos}: relative L2 {err:.2e}"


IMG = 512  # the tiny preset's <|image|>


@pytest.mark.parametrize("ratio_id", range(1, 9))
def test_every_aspect_ratio(tiny_hf, tiny_model, ratio_id):
    images = random_images(tiny_model.config, [[ratio_id]], seed=ratio_id)
    assert_logits_match(tiny_hf, tiny_model, [[500, IMG, 11, 12, 13, 14, 15]], images)


def test_two_images_in_one_prompt(tiny_hf, tiny_model):
    images = random_images(tiny_model.config, [[3, 6]], seed=1)
    prompt = [500, IMG, 30, 31, IMG, 32, 33, 34]
    assert_logits_match(tiny_hf, tiny_model, [prompt], images)


def test_consecutive_images_share_the_text(tiny_hf, tiny_model):
    images = random_images(tiny_model.config, [[1, 5]], seed=2)
    assert_logits_match(tiny_hf, tiny_model, [[500, IMG, IMG, 40, 41, 42]], images)


def test_text_only_prompt(tiny_hf, tiny_model):
    assert_logits_match(tiny_hf, tiny_model, [[500, 60, 61, 62, 63]], None)


def test_padded_batch_of_two(tiny_hf, tiny_model):
    images = random_images(tiny_model.config, [[6], [2]], seed=3)
    prompts = [[500, IMG, 70, 71, 72, 73, 74, 75, 76], [500, IMG, 80, 81]]
    assert_logits_match(tiny_hf, tiny_model, prompts, images)


@pytest.mark.parametrize(
    "prompts, ratios",
    [
        ([[500, IMG, 90, 91, 92]], [[4]]),
        ([[500, IMG, 93, IMG, 94, 95]], [[1, 8]]),
        ([[500, 96, 97, 98]], None),
        (
            [[500, IMG, 99, 100, 101, 102, 103], [500, IMG, 104], [500, IMG, IMG, 105, 106]],
            [[6], [1], [2, 3]],
        ),
    ],
    ids=["one-image", "two-images", "text-only", "padded-batch-of-3"],
)
def test_greedy_generation_matches_transformers(tiny_hf, tiny_model, prompts, ratios):
    images = random_images(tiny_model.config, ratios, seed=4) if ratios else None
    runner = torch_runner(tiny_model)
    ours = runner.generate_ids(prompts, images, max_new_tokens=20, stop_tokens=set()).token_ids
    assert ours == hf_generate(tiny_hf, runner, prompts, images, 20)


def test_rope_frequencies_match_transformers(tiny_hf, tiny_model):
    ref = tiny_hf.model.language_model.rotary_emb.inv_freq
    torch.testing.assert_close(tiny_model.text.rotary.inv_freq, ref, rtol=1e-6, atol=0)


def test_vision_taps_differ_between_semantics(tiny_model, tiny_model_meta):
    """Guards the finding that transformers 5.x taps layer outputs: the two must not agree."""
    images = random_images(tiny_model.config, [[6]], seed=5)
    args = [
        torch.from_numpy(a)
        for a in (
            images.pixel_values[:, 0],
            images.aspect_ratio_ids[:, 0],
            images.aspect_ratio_mask[:, 0],
        )
    ]
    with torch.no_grad():
        hf_taps = tiny_model.vision(*args)[..., 32:]
        meta_taps = tiny_model_meta.vision(*args)[..., 32:]
    assert rel_l2(meta_taps, hf_taps) > 1e-2
