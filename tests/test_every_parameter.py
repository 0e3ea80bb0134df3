"""Every tensor of the synthetic checkpoint moves the logits: no part of the model is dead."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_images, torch_runner

from mllama_export.graphs.weights import load_model

IMG = 512


@pytest.mark.parametrize("semantics", ["meta", "hf"])
def test_perturbing_any_tensor_changes_the_logits(tiny_dir, semantics):
    model = load_model(tiny_dir, semantics)
    runner = torch_runner(model)
    images = random_images(model.config, [[6, 3]], seed=11)
    prompt = [500, 40, IMG, 41, 42, IMG, 43, 44]
    base = prefill_logits(runner, prompt, images)
    dead = []
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        saved = param.detach().clone()
        noise = torch.randn(param.shape, generator=gen)
        with torch.no_grad():
            param.add_(1e-2 * (saved.abs().mean() + 1e-3) * noise)
        if np.abs(prefill_logits(runner, prompt, images) - base).max() < 1e-5:
            dead.append(name)
        with torch.no_grad():
            param.copy_(saved)
    assert not dead, f"{semantics}: logits ignore {dead}"
    assert np.array_equal(prefill_logits(runner, prompt, images), base)


def prefill_logits(runner, prompt, images):
    return runner.generate_ids([prompt], images, 1, keep_logits=True).prefill_logits


def test_every_tanh_gate_is_far_from_zero(tiny_model):
    gates = {n: p for n, p in tiny_model.named_parameters() if "gate" in n.rsplit(".", 1)[-1]}
    # vision: 2 tile embeddings + position + 2 per global layer; text: 2 per cross layer
    assert len(gates) == 3 + 2 * 2 + 2 * 2
    assert all(p.tanh().abs().item() > 0.35 for p in gates.values()), gates
