"""LLaVA's three graphs exported with torch.onnx (dynamo) and run in ONNX Runtime: greedy tokens
and every step's logits against transformers' generate, fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from llava_cases import (
    REL_L2,
    built,
    export_onnx,
    greedy,
    hf_generate,
    onnx_runner,
    prefill_feed,
    random_tiles,
    rel_l2,
    torch_runner,
)
from test_llava_reference import SIZES, generation_inputs, prompt

from mllama_export.graphs.llava_contract import GRAPHS
from mllama_export.graphs.llava_model import GRAPH_CLASSES

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def exported(request, tmp_path_factory):
    case = built(request.param, tmp_path_factory)
    folder = tmp_path_factory.mktemp(f"onnx-{request.param}")
    for name, cls in GRAPH_CLASSES.items():
        export_onnx(cls(case.ours), case.config, folder / f"{name}.onnx")
    return case, folder, onnx_runner(folder)


def test_graphs_have_the_contract_names_and_dims(exported):
    _, folder, _ = exported
    for name, spec in GRAPHS.items():
        inputs, outputs = spec.inputs, spec.outputs
        model = onnx.load(str(folder / f"{name}.onnx"), load_external_data=False)
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == [s.name for s in inputs]
        assert [o.name for o in model.graph.output] == [s.name for s in outputs]
        for value, spec in zip(model.graph.input, inputs, strict=True):
            assert len(value.type.tensor_type.shape.dim) == len(spec.dims), spec.name


@pytest.mark.parametrize("name", ["padded-batch-of-3", "two-images"])
def test_onnxruntime_greedy_matches_transformers(exported, name):
    case, _, run = exported
    rows, image_sizes, pixels = generation_inputs(case, name)
    tokens, logits = greedy(case.config, rows, image_sizes, pixels, run, 20)
    ref_tokens, ref_logits = hf_generate(case.hf, case.config, rows, image_sizes, pixels, 20)
    np.testing.assert_array_equal(tokens, ref_tokens)
    for step in range(20):
        for b in range(len(rows)):
            err = rel_l2(logits[step, b], ref_logits[step, b])
            assert err < REL_L2, f"step {step} row {b}: relative L2 {err:.2e}"


def test_onnxruntime_runs_a_batch_without_images(exported):
    """No tile at all: the feature table holds only its spare row, every gather stays valid."""
    case, _, run = exported
    rows = [prompt(case, [], [5], seed=40), prompt(case, [], [9], seed=41)]
    ours, _ = greedy(case.config, rows, [[], []], np.zeros((0, 3, 1, 1), np.float32), run, 4)
    ref, _ = greedy(
        case.config, rows, [[], []], np.zeros((0, 3, 1, 1), np.float32), torch_runner(case.ours), 4
    )
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("tiles", [1, 2, 7])
def test_vision_takes_any_number_of_tiles(exported, tiles):
    case, _, run = exported
    v = case.config.vision
    pixels = np.random.default_rng(tiles).standard_normal((tiles, 3, v.image_size, v.image_size))
    pixels = pixels.astype(np.float32)
    feed = {"pixel_values": pixels}
    ours = run("vision", feed)[0]
    ref = torch_runner(case.ours)("vision", feed)[0]
    assert ours.shape == (tiles, case.config.tile_tokens, case.config.text.hidden_size)
    assert rel_l2(ours, ref) < REL_L2


def test_prefill_returns_only_the_asked_positions(exported):
    case, _, run = exported
    pixels = random_tiles(case.config, [SIZES], 3)
    rows = [prompt(case, SIZES, [2, 1, 4], seed=42)]
    _, feed = prefill_feed(case.config, rows, [SIZES], pixels, run, positions=[0, 5, 2])
    logits = run("prefill", feed)[0]
    _, full = prefill_feed(case.config, rows, [SIZES], pixels, run)
    every = run("prefill", full)[0]
    assert logits.shape == (1, 3, case.config.text.vocab_size)
    assert rel_l2(logits, every[:, [0, 5, 2]]) < REL_L2
