"""The generic runner over a family's session part: a one-graph family without a cache (the
whole sequence rerun every step: tests/standin_family.py's session) gets sampling, stop
tokens, forced tokens and kept logits from the runner alone."""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
from standin_family import Session as StubSession  # the stand-in family's session

from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError
from mllama_export.graphs import family as registry
from mllama_export.graphs.family import Family
from mllama_export.graphs.limits import Limits

VOCAB, EOS = 11, 10
MODULE = "mllama_export.engines._runner_session_stub"


@dataclass(frozen=True)
class StubConfig:
    vocab_size: int = VOCAB
    eos_token_ids: tuple[int, ...] = (EOS,)
    pad_token_id: int | None = 0
    bos_token_id: int = 1


class StubInputs:
    """The inputs part: token ids only, the batch size checked."""

    def __init__(self, limits):
        self.limits, self.tokenizer, self.image_config = limits, None, None

    @classmethod
    def for_config(cls, config, limits=None, tokenizer=None, image_config=None):
        return cls(limits)

    def check_request(self, prompts, images, max_new_tokens):
        if not prompts or len(prompts) > self.limits.max_batch:
            raise MllamaExportError(f"a batch of {len(prompts)} prompts")


class NextToken:
    """The "lm" graph's backend: position i's logits pick token ids[i] + 1 (mod the vocab)."""

    name, inputs, outputs = "stub", (), ()

    def __init__(self):
        self.calls = []

    def infer(self, feed):
        self.calls.append(feed["input_ids"].shape)
        return {"logits": np.eye(VOCAB, dtype=np.float32)[(feed["input_ids"] + 1) % VOCAB]}


@pytest.fixture
def runner():
    module = types.ModuleType(MODULE)
    module.StubConfig, module.StubInputs, module.StubSession = StubConfig, StubInputs, StubSession
    module.GRAPHS = {"lm": None}
    sys.modules[MODULE] = module
    part = MODULE.removeprefix("mllama_export.")
    parts = {"config": f"{part}:StubConfig", "contract": part}
    parts |= {"inputs": f"{part}:StubInputs", "session": f"{part}:StubSession"}
    registry.register(Family("stub", "a stub", ("stub_lm",), parts))
    try:
        yield Runner(StubConfig(), {"lm": NextToken()}, Limits(2, 32, 0))
    finally:
        registry._FAMILIES.pop("stub")
        sys.modules.pop(MODULE)


def test_a_cacheless_session_generates_until_the_configs_stop_token(runner):
    gen = runner.generate_ids([[3, 4], [7]], max_new_tokens=8, keep_logits=True)
    assert gen.token_ids == [[5, 6, 7, 8, 9, EOS], [8, 9, EOS]]
    assert gen.prefill_logits.shape == (2, 2, VOCAB)
    assert gen.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert len(gen.step_logits) == gen.timings["decode_steps"] == 5
    assert runner.lm.calls == [(2, n) for n in range(2, 8)]  # the whole sequence every step
    assert runner.max_step_tokens() is None and "prefill_s" in gen.timings


def test_forced_tokens_and_refusals_are_the_runners(runner):
    forced = np.array([[1, 2], [3, 4], [5, 6]])
    gen = runner.generate_ids([[3], [4]], max_new_tokens=3, forced=forced, stop_tokens=set())
    assert gen.token_ids == [[1, 3, 5], [2, 4, 6]]
    with pytest.raises(MllamaExportError, match=r"forced tokens of shape \[2, 2\]"):
        runner.generate_ids([[3], [4]], max_new_tokens=3, forced=forced[:2])
    with pytest.raises(MllamaExportError, match="a batch of 3 prompts"):
        runner.generate_ids([[3], [4], [5]])
    with pytest.raises(MllamaExportError, match="prefills in one call"):
        runner.generate_ids([[3]], prefill_chunk=1)
    with pytest.raises(MllamaExportError, match=r"no graphs of the a stub family.*\['lm'\]"):
        Runner(StubConfig(), {"decode": NextToken()}, Limits(2, 32, 0))


def test_a_copy_replaces_its_backends_alone(runner):
    other = copy.copy(runner)
    other.lm = NextToken()
    assert other.lm is not runner.lm and runner.backends["lm"] is runner.lm
