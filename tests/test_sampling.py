"""Sampling: properties over random logits, temperatures, top-k and top-p (hypothesis), and the
defaults that once crashed (`run --temperature 0.8`, `Sampling(temperature=0.7)`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mllama_export.cli import main
from mllama_export.engines.sampling import Sampling, TokenPicker
from mllama_export.errors import MllamaExportError

logit = st.floats(-60, 60, allow_nan=False, width=32) | st.just(-np.inf)
logit_rows = st.integers(1, 3).flatmap(
    lambda b: st.integers(1, 40).flatmap(lambda v: arrays(np.float32, (b, v), elements=logit))
)
samplings = st.builds(
    Sampling,
    temperature=st.floats(1e-3, 5.0) | st.just(1.0),
    top_k=st.integers(0, 45),
    top_p=st.floats(1e-6, 1.0, exclude_min=True) | st.just(1.0),
    seed=st.integers(0, 2**32),
)


def allowed(row: np.ndarray, s: Sampling) -> set[int]:
    """The tokens a sampler may return, from the definitions alone: among the top_k highest
    logits, and (nucleus) the probability of the tokens strictly likelier than it, among
    those, is below top_p. A row with no finite logit allows its first token only."""
    if not np.isfinite(row).any():
        return {0}
    candidates = range(len(row))
    if s.top_k:
        candidates = [i for i in candidates if (row > row[i]).sum() < s.top_k]
    scaled = row.astype(np.float64)[list(candidates)] / s.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    mass = {i: probs[[row[j] > row[i] for j in candidates]].sum() for i in candidates}
    return {i for i in candidates if np.isfinite(row[i]) and mass[i] < s.top_p + 1e-9}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logits=logit_rows, sampling=samplings)
def test_every_token_is_allowed_and_a_seed_repeats_the_draw(logits, sampling):
    first = TokenPicker(sampling)
    tokens = [first(logits) for _ in range(3)]
    for drawn in tokens:
        assert drawn.dtype == np.int64 and drawn.shape == (logits.shape[0],)
        for row, token in zip(logits, drawn, strict=True):
            assert int(token) in allowed(row, sampling)
    again = TokenPicker(sampling)
    assert all(np.array_equal(a, again(logits)) for a in tokens)


@settings(max_examples=100, deadline=None)
@given(logits=logit_rows, sampling=samplings)
def test_greedy_at_temperature_zero_and_where_only_the_top_token_is_left(logits, sampling):
    greedy = TokenPicker(Sampling(seed=sampling.seed))(logits)
    assert np.array_equal(greedy, logits.argmax(-1))
    one = Sampling(sampling.temperature, 1, sampling.top_p, sampling.seed)
    assert np.array_equal(TokenPicker(one)(logits), greedy)
    tiny_p = Sampling(sampling.temperature, sampling.top_k, 1e-12, sampling.seed)
    assert np.array_equal(TokenPicker(tiny_p)(logits), greedy)


def test_draws_follow_the_softmax_at_top_p_one():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float64))
    picker = TokenPicker(Sampling(temperature=1.0, seed=0))
    counts = np.bincount([int(picker(logits)[0]) for _ in range(20000)], minlength=4)
    assert np.allclose(counts / counts.sum(), [0.5, 0.3, 0.15, 0.05], atol=0.012)


def test_the_default_top_p_never_asks_for_more_tokens_than_there_are():
    # The cumulative sum of these rounds to just below 1: the old code kept len + 1 tokens.
    logits = np.zeros((1, 7), np.float32)
    for seed in range(200):
        assert 0 <= int(TokenPicker(Sampling(temperature=0.7, seed=seed))(logits)[0]) < 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature -1 (expected a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature nan"),
        ({"top_k": -2}, "top_k -2 (expected an integer >= 0"),
        ({"top_k": 1.5}, "top_k 1.5"),
        ({"top_p": 0}, "top_p 0 (expected 0 < top_p <= 1"),
        ({"top_p": 1.5}, "top_p 1.5"),
        ({"seed": -1}, "seed -1 (expected an integer >= 0"),
    ],
)
def test_options_out_of_range_are_one_error_naming_the_range(kwargs, message):
    with pytest.raises(MllamaExportError, match="invalid sampling") as info:
        Sampling(**kwargs)
    assert message in str(info.value)


def test_nan_logits_are_an_error_not_a_token():
    with pytest.raises(MllamaExportError, match="logits hold NaN"):
        TokenPicker(Sampling(temperature=1.0))(np.array([[0.0, np.nan]], np.float32))


def test_the_api_generates_at_temperature_07(ort_artifacts):
    from mllama_export.engines.runner import Runner

    runner = Runner.from_artifacts(ort_artifacts)
    out = runner.generate("Hi", max_new_tokens=6, sampling=Sampling(temperature=0.7, seed=0))
    again = runner.generate("Hi", max_new_tokens=6, sampling=Sampling(temperature=0.7, seed=0))
    assert 1 <= len(out.token_ids) <= 6 and out.token_ids == again.token_ids


def test_run_generates_at_temperature_08(ort_artifacts):
    args = ["run", str(ort_artifacts), "--prompt", "Hi", "--temperature", "0.8"]
    result = CliRunner().invoke(main, [*args, "--max-new-tokens", "6", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert 1 <= len(json.loads(result.stdout)["token_ids"]) <= 6
