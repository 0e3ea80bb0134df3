from pathlib import Path

from mllama_export.graphs.contracts import contracts_markdown


def test_docs_graphs_md_is_generated_from_every_familys_contract():
    doc = Path(__file__).parent.parent / "docs" / "graphs.md"
    assert doc.read_text() == contracts_markdown(), (
        "run: python -m mllama_export.graphs.contracts > docs/graphs.md"
    )
    assert "# LLaVA 1.5 and LLaVA-NeXT" in doc.read_text()


def test_serving_prefill_returns_the_last_position_and_the_gate_every_one(tiny_model):
    """logit_positions: the runner asks for [S - 1] (logits [B, 1, V], the lm_head on one row
    per sequence); keep_logits and the gate ask for every position, the same values."""
    import numpy as np
    import pytest
    from conftest import torch_runner

    from mllama_export.engines.evalset import EvalCase
    from mllama_export.engines.steps import logit_positions
    from mllama_export.errors import MllamaExportError
    from mllama_export.validate.gate import trace_runner

    runner = torch_runner(tiny_model)
    seen = []
    infer = runner.prefill.infer
    runner.prefill.infer = lambda feed: seen.append(feed) or infer(feed)
    prompts = [[500, 20, 21, 22, 23], [500, 24]]
    runner.generate_ids(prompts, max_new_tokens=2, stop_tokens=set())
    served = infer(seen[-1])
    assert seen[-1]["logit_positions"].tolist() == [4]
    assert served["logits"].shape == (2, 1, tiny_model.config.text.vocab_size)
    every = runner.generate_ids(prompts, max_new_tokens=2, stop_tokens=set(), keep_logits=True)
    assert seen[-1]["logit_positions"].tolist() == [0, 1, 2, 3, 4]
    assert every.prefill_logits.shape == (2, 5, tiny_model.config.text.vocab_size)
    np.testing.assert_allclose(every.prefill_logits[:, -1], served["logits"][:, 0], atol=1e-5)
    # the gate judges every real prompt position: 5 + 2 rows
    trace = trace_runner(runner, EvalCase("two", prompts), steps=1)
    assert trace.prefill.shape == (7, tiny_model.config.text.vocab_size)
    assert logit_positions(6, 2).tolist() == [4, 5]
    with pytest.raises(MllamaExportError, match="last 7 of 6"):
        logit_positions(6, 7)
