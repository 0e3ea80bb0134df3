"""Layer-streamed runs (exporter/layerwise.py): calibration without the model in memory gives
the whole-model scales (bit for bit where the BLAS is reproducible), each layer is read once
per graph call, and the jobs' overrides, errors and the vision attention's chunking behave.

Peak memory flat in depth is measured by benchmarks/export_memory.py --precision fp8, not
here (docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mllama_export.engines.evalset import build_evalset
from mllama_export.engines.runner import Limits
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.calibrate import calibrate, calibrate_streamed
from mllama_export.exporter.layerwise import (
    Job,
    LayerMajor,
    LazyModel,
    chunked_vision_attention,
    unit_prefixes,
)
from mllama_export.graphs.config import preset
from mllama_export.graphs.quant import quantizable_linears
from mllama_export.graphs.vision import VisionAttention
from mllama_export.graphs.weights import Checkpoint, load_model

LIMITS = Limits(4, 512, 2)


@pytest.fixture(scope="module")
def cases():
    return build_evalset(preset("tiny"), LIMITS, 8)


# One float32 rounding at the largest input: MKL without its conditional numerical
# reproducibility picks GEMM kernels by the operands' memory alignment, which differs between
# a model loaded whole and one read layer by layer (AMD EPYC, torch 2.13: 3 of 79 scales of
# the hf model one ulp apart). Under MKL_CBWR the two are equal bit for bit (the test below).
ULPS = 4 * 2.0**-23


def _calibrations(tiny_dir, semantics: str) -> tuple[list[str], dict, dict]:
    model = load_model(tiny_dir, semantics, torch.float32)
    names = quantizable_linears(model, vision=True)  # the vision encoder's layers too
    cases = build_evalset(preset("tiny"), LIMITS, 8)
    whole = calibrate(model, names, cases, LIMITS)
    streamed = calibrate_streamed(
        Checkpoint(tiny_dir, preset("tiny")), semantics, names, cases, LIMITS
    )
    return names, whole, streamed


@pytest.mark.parametrize("semantics", ["meta", "hf"])
def test_streamed_calibration_equals_the_whole_model(tiny_dir, semantics):
    names, whole, streamed = _calibrations(tiny_dir, semantics)
    assert list(streamed) == names and len(names) == 79 and all(v > 0 for v in whole.values())
    assert all(abs(streamed[n] - whole[n]) <= ULPS * whole[n] for n in names), {
        n: (whole[n], streamed[n]) for n in names if whole[n] != streamed[n]
    }


def test_streamed_calibration_is_bit_for_bit_under_reproducible_blas(tiny_dir):
    """The same computation, not only a close one: with MKL's reproducible mode every scale of
    both semantics is equal, float for float (a fresh process: MKL reads MKL_CBWR once)."""
    script = (
        "import sys; from test_fp8_streamed import _calibrations\n"
        "for semantics in ('meta', 'hf'):\n"
        "    names, whole, streamed = _calibrations(sys.argv[1], semantics)\n"
        "    print(semantics, sum(whole[n] != streamed[n] for n in names), len(names))\n"
    )
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_dir)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-3:] == ["meta 0 79", "hf 0 79", ""], done.stdout


def test_each_unit_is_read_once_per_graph_call_for_all_cases(tiny_dir, cases):
    lazy = LazyModel(Checkpoint(tiny_dir, preset("tiny")))
    runner = lazy.runner(LIMITS)
    steps = 3
    jobs = [Job(lambda c=c: runner.generate_ids(c.prompts, c.images, steps + 1, stop_tokens=set()))
            for c in cases]  # fmt: skip
    scheduler = LayerMajor(lazy)
    results = scheduler.run(jobs)
    assert all(len(r.token_ids[0]) == steps + 1 for r in results)
    c = preset("tiny")
    vision = c.vision.num_layers + c.vision.num_global_layers
    text = 1 + c.text.num_layers + 1  # embedding, decoder layers, lm_head
    # the vision graph: its layers, then the cross-attention layers' k/v; then the prefill
    # and every decode step: each unit once per phase, for all six cases at once
    cross = len(c.text.cross_attention_layers)
    assert scheduler.loads == vision + cross + (1 + steps) * text
    assert len(unit_prefixes(c)) == vision + text
    # every unit is dropped again: the model holds only its small tensors
    for prefix in unit_prefixes(c):
        assert all(p.is_meta for p in lazy.model.get_submodule(prefix).parameters())


def test_overrides_apply_to_their_job_only_and_are_removed(tiny_dir, cases):
    lazy = LazyModel(Checkpoint(tiny_dir, preset("tiny")))
    runner = lazy.runner(LIMITS)
    name = "text.layers.2.mlp.down_proj"
    seen = []

    def zero(module):
        def forward(x):
            seen.append(threading.current_thread().name)
            return torch.zeros(*x.shape[:-1], module.out_features)

        return forward

    case = cases[0]

    def logits():
        out = runner.generate_ids(case.prompts, case.images, 2, stop_tokens=set(), keep_logits=True)
        return out.prefill_logits

    plain, zeroed = LayerMajor(lazy).run([Job(logits), Job(logits, {name: zero})])
    assert seen and not (plain == zeroed).all()
    assert "forward" not in vars(lazy.model.get_submodule(name))
    (again,) = LayerMajor(lazy).run([Job(logits)])
    assert (again == plain).all()


def test_a_failing_job_stops_the_others_and_its_error_is_raised(tiny_dir, cases):
    lazy = LazyModel(Checkpoint(tiny_dir, preset("tiny")))
    runner = lazy.runner(LIMITS)

    def generate(case):
        return runner.generate_ids(case.prompts, case.images, 3, stop_tokens=set())

    def fails():
        raise MllamaExportError("a planted failure")

    jobs = [Job(lambda: generate(cases[1])), Job(fails), Job(lambda: generate(cases[2]))]
    with pytest.raises(MllamaExportError, match="a planted failure"):
        LayerMajor(lazy).run(jobs)
    assert all(job.done for job in jobs) and lazy.scheduler is None
    with pytest.raises(RuntimeError, match="inside LayerMajor.run"):
        generate(cases[1])  # outside a run the lazy model refuses, rather than compute on meta


def test_chunked_vision_attention_is_the_graphs_attention(tiny_model):
    attn = next(m for m in tiny_model.vision.modules() if isinstance(m, VisionAttention))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 96, 32, generator=gen)
    allowed = torch.rand(3, 1, 96, 96, generator=gen) > 0.2
    with torch.inference_mode():
        exact = VisionAttention.forward(attn, x, allowed)
        same = chunked_vision_attention(attn, x, allowed)  # within the budget: the same code
        chunked = chunked_vision_attention(attn, x, allowed, budget=12 * 2 * 96 * 10)
    assert torch.equal(same, exact)
    assert torch.allclose(chunked, exact, rtol=1e-5, atol=1e-6)
