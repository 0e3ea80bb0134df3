"""One suite, every backend: PyTorch graphs, ONNX Runtime and onnx.reference on the exported
files.

Each backend is held to the same facts: logits equal to transformers (hf semantics, fp32),
greedy tokens equal to transformers' generate, and equal to each other at every step.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import hf_generate, random_images, torch_runner

from mllama_export.engines.inputs import prompt_feed
from mllama_export.engines.runner import Runner

IMG = 512
CASES = {
    "text-only": ([[500, 21, 22, 23]], None),
    "one-image": ([[500, IMG, 24, 25, 26]], [[4]]),
    "two-images": ([[500, IMG, 27, IMG, 28, 29]], [[1, 8]]),
    "padded-batch-of-3": (
        [[500, IMG, 30, 31, 32, 33, 34], [500, IMG, 35], [500, IMG, IMG, 36, 37]],
        [[6], [1], [2, 3]],
    ),
}


@pytest.fixture(
    scope="session", params=["torch", "onnxruntime", "onnxruntime-iobinding", "onnx-reference"]
)
def runner(request, tiny_model, ort_artifacts) -> Runner:
    if request.param == "torch":
        return torch_runner(tiny_model)
    if request.param == "onnx-reference":
        return Runner.from_artifacts(ort_artifacts, backend="onnx-reference")
    # io-binding: caches in torch buffers bound by pointer, the CUDA provider's code path
    return Runner.from_artifacts(ort_artifacts, io_binding=request.param.endswith("iobinding"))


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_transformers_generate(runner, tiny_hf, tiny_model, case):
    prompts, ratios = CASES[case]
    images = random_images(tiny_model.config, ratios, seed=21) if ratios else None
    ours = runner.generate_ids(prompts, images, max_new_tokens=20, stop_tokens=set()).token_ids
    assert ours == hf_generate(tiny_hf, runner, prompts, images, 20)


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_the_pytorch_graphs_at_every_step(runner, tiny_model, case):
    prompts, ratios = CASES[case]
    images = random_images(tiny_model.config, ratios, seed=22) if ratios else None
    reference = torch_runner(tiny_model)
    kw = dict(max_new_tokens=12, stop_tokens=set(), keep_logits=True)
    ours, ref = (
        runner.generate_ids(prompts, images, **kw),
        reference.generate_ids(prompts, images, **kw),
    )
    assert ours.token_ids == ref.token_ids
    real = prompt_feed(reference.config, prompts, images)["attention_mask"] != 0
    steps = [(ours.prefill_logits[real], ref.prefill_logits[real])]
    steps += list(zip(ours.step_logits, ref.step_logits, strict=True))
    for step, (a, b) in enumerate(steps):
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err < 1e-5, f"step {step}: relative L2 {err:.2e}"


def test_sampling_is_seeded_and_top_k_1_is_greedy(runner):
    from mllama_export.engines.sampling import Sampling

    prompt = [[500, 40, 41, 42]]
    sampled = [
        runner.generate_ids(prompt, None, 10, Sampling(1.0, 0, 0.9, seed=5)).token_ids
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    greedy = runner.generate_ids(prompt, None, 10).token_ids
    assert runner.generate_ids(prompt, None, 10, Sampling(0.7, top_k=1, seed=1)).token_ids == greedy


def test_stop_tokens_end_each_row(runner):
    prompt = [[500, 50, 51], [500, 52]]
    free = runner.generate_ids(prompt, None, 8, stop_tokens=set()).token_ids
    stop = {free[0][2]}
    stopped = runner.generate_ids(prompt, None, 8, stop_tokens=stop).token_ids
    assert stopped[0] == free[0][:3]
    first_stop = next((i for i, t in enumerate(free[1]) if t in stop), None)
    assert stopped[1] == (free[1] if first_stop is None else free[1][: first_stop + 1])


def test_cache_bytes_per_step_do_not_grow_with_the_past(runner):
    short = runner.generate_ids([[500, 1, 2]], None, 4, stop_tokens=set())
    long = runner.generate_ids([[500, *range(3, 120)]], None, 40, stop_tokens=set())
    assert short.cache_bytes_per_step == long.cache_bytes_per_step > 0
