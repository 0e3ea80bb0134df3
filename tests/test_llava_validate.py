"""LLaVA's gate references: transformers' LLaVA models (the "reference" part) against our
PyTorch graphs on the tiny presets' synthetic checkpoints, teacher-forced as the gate runs them,
and the preset's model made in memory (the "synthetic_model" part) against the written one."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from llava_cases import REL_L2, greedy, prefill_feed, random_tiles, rel_l2, torch_runner

from mllama_export.engines.llava_preprocess import LlavaImages
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.checkpoint import load_model
from mllama_export.graphs.family import family_named
from mllama_export.graphs.llava_layout import image_tiles, image_token_count
from mllama_export.graphs.llava_presets import llava_preset
from mllama_export.graphs.synthetic import write_checkpoint
from mllama_export.validate.gate import ReferenceWeights
from mllama_export.validate.llava_reference import TransformersReference, synthetic_model

pytest.importorskip("transformers")

SEED = 5
STEPS = 4


@dataclass
class Case:
    """A LLaVA evaluation case as the gate passes it (validate/llava_reference.py)."""

    name: str
    prompts: list[list[int]]
    images: LlavaImages | None


@pytest.fixture(scope="module", params=["llava-tiny", "llava-next-tiny"])
def sides(request, tmp_path_factory):
    """(config, folder, transformers' reference, our synthetic model) for one tiny preset."""
    config = llava_preset(request.param)
    folder = write_checkpoint(config, tmp_path_factory.mktemp(request.param), SEED, shards=2)
    with ExitStack() as stack:
        ref = TransformersReference.from_weights({}, ReferenceWeights(config, folder), stack)
    return config, folder, ref, synthetic_model(config, SEED)


def make_case(config, name, image_sizes, text_lengths, seed) -> Case:
    """Rows of text runs with each image's expanded tokens between them."""
    rng = np.random.default_rng(seed)
    special = {config.image_token_id, *config.text.eos_token_ids, config.pad_token_id}
    low = min(s for s in special if s is not None)
    rows = []
    for sizes, lengths in zip(image_sizes, text_lengths, strict=True):
        ids = [config.text.bos_token_id, *rng.integers(0, low, lengths[0]).tolist()]
        for size, n in zip(sizes, lengths[1:], strict=True):
            ids += [config.image_token_id] * image_token_count(config, size)
            ids += rng.integers(0, low, n).tolist()
        rows.append(ids)
    if not any(image_sizes):
        return Case(name, rows, None)
    pixels = random_tiles(config, image_sizes, seed)
    tiles = [[image_tiles(config, s) for s in row] for row in image_sizes]
    return Case(name, rows, LlavaImages(pixels, [list(r) for r in image_sizes], tiles))


CASES = {
    "text-only": ([[]], [[7]]),
    "one-image": ([[(40, 90)]], [[3, 4]]),
    "two-images": ([[(90, 40), (50, 50)]], [[2, 3, 2]]),
    "padded-batch-of-3": ([[(30, 160)], [], [(120, 60), (20, 25)]], [[1, 2], [9], [2, 1, 3]]),
}


def our_trace(config, model, case: Case, forced: np.ndarray):
    """Our graphs, run as the gate runs the backend: (vision, prefill, step logits)."""
    run = torch_runner(model)
    sizes = case.images.image_sizes if case.images else [[] for _ in case.prompts]
    pixels = case.images.pixel_values if case.images else random_tiles(config, sizes, 0)
    batch, feed = prefill_feed(config, case.prompts, sizes, pixels, run)
    prefill = run("prefill", feed)[0][batch["attention_mask"] != 0]
    vision = run("vision", {"pixel_values": pixels})[0] if case.images else None
    _, logits = greedy(config, case.prompts, sizes, pixels, run, STEPS + 1, forced)
    return vision, prefill, logits[1:]


@pytest.mark.parametrize("name", CASES)
def test_our_graphs_match_the_transformers_reference(sides, name):
    config, _, ref, ours = sides
    case = make_case(config, name, *CASES[name], seed=len(name))
    trace = ref.trace(case, STEPS)
    assert trace.tokens.shape == (STEPS + 1, len(case.prompts))
    assert trace.prefill.shape == (sum(map(len, case.prompts)), config.text.vocab_size)
    vision, prefill, steps = our_trace(config, ours, case, trace.tokens)
    assert set(trace.stages) == ({"vision"} if case.images else set())
    if case.images:
        assert trace.stages["vision"].shape == vision.shape
        assert rel_l2(vision, trace.stages["vision"]) < REL_L2
    assert rel_l2(prefill, trace.prefill) < REL_L2
    assert len(trace.steps) == STEPS
    for i, (a, r) in enumerate(zip(steps, trace.steps, strict=True)):
        assert rel_l2(a, r) < REL_L2, f"decode[{i}]"


def test_the_reference_judges_transformers_own_features(sides):
    """Not vacuous: a perturbed projector in transformers moves the vision stage and the
    logits far past the gate's fp32 limits, while ours stays put."""
    config, _, ref, ours = sides
    case = make_case(config, "one", [[(40, 90)]], [[3, 4]], seed=1)
    before = ref.trace(case, 1)
    weight = ref.model.model.multi_modal_projector.linear_2.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0] += 0.5
        after = ref.trace(case, 1)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert rel_l2(after.stages["vision"], before.stages["vision"]) > 1e-3
    assert rel_l2(after.prefill, before.prefill) > 1e-4


def test_synthetic_model_is_the_checkpoint_synth_writes(sides):
    config, folder, _, ours = sides
    written = load_model(folder)
    mine, theirs = ours.state_dict(), written.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name
    torch.testing.assert_close(ours.text.rotary.inv_freq, written.text.rotary.inv_freq)
    with pytest.raises(MllamaExportError, match="takes no options"):
        synthetic_model(config, SEED, semantics="hf")


def test_the_family_names_both_parts():
    family = family_named("llava")
    assert family.part("reference") is TransformersReference
    assert family.part("synthetic_model") is synthetic_model


def test_a_case_whose_tiles_do_not_match_its_images_is_refused(sides):
    config, _, ref, _ = sides
    case = make_case(config, "one", [[(40, 90)]], [[3, 4]], seed=1)
    case.images.pixel_values = case.images.pixel_values[:0]
    with pytest.raises(MllamaExportError, match="the case has 0 tiles but its 1 images take"):
        ref.trace(case, 1)
