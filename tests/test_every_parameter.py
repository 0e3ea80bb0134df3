"""Every tensor of the synthetic checkpoint moves the logits: no part of the model is dead."""

from __future__ import annotations

import numpy as np
import torch
from conftest import random_images, torch_runner

from mllama_export.graphs.weights import load_model

IMG = 512


def test_perturbing_any_tensor_changes_the_logits(tiny_dir):
    for semantics in ("meta", "hf"):
        model = load_model(tiny_dir, semantics)
        runner = torch_runner(model)
        images = random_images(model.config, [[6, 3]], seed=11)
        prompt = [500, 40, IMG, 41, 42, IMG, 43, 44]

        def logits():
            return runner.generate_ids([prompt], images, 1, keep_logits=True).prefill_logits

        base = logits()
        dead = []
        gen = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            saved = param.detach().clone()
            with torch.no_grad():
                param.add_(
                    1e-2 * (saved.abs().mean() + 1e-3) * torch.randn(param.shape, generator=gen)
                )
            if np.abs(logits() - base).max() < 1e-5:
                dead.append(name)
            with torch.no_grad():
                param.copy_(saved)
        assert not dead, f"{semantics}: logits ignore {dead}"
        assert np.array_equal(logits(), base)


def test_every_tanh_gate_is_far_from_zero(tiny_model):
    gates = {n: p for n, p in tiny_model.named_parameters() if "gate" in n.rsplit(".", 1)[-1]}
    # vision: 2 tile embeddings + position + 2 per global layer; text: 2 per cross layer
    assert len(gates) == 3 + 2 * 2 + 2 * 2
    assert all(p.tanh().abs().item() > 0.35 for p in gates.values()), gates
