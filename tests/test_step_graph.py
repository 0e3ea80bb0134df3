"""The decode (step) graph: one new token is the one-token decode graph it replaced, bit for bit
(in PyTorch and in ONNX Runtime, on fp32); several new tokens continue a prefill as one-shot
prefill computes it; artifacts with the old decode graph still run, and give the same tokens."""

from __future__ import annotations

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from legacy_decode import LegacyDecodeGraph

from mllama_export.engines.inputs import prompt_feed
from mllama_export.engines.manifest_read import read_manifest
from mllama_export.engines.onnxrt import OnnxRuntimeBackend
from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.build import _spec_json
from mllama_export.exporter.manifest import write_manifest
from mllama_export.exporter.onnx_export import example_inputs, export_graph
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.model import DecodeGraph, PrefillGraph

IMG = 512


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def legacy_feed(config, sizes: dict, seed: int, pad_rows: int = 1) -> dict[str, torch.Tensor]:
    """Random inputs of the old graph, with left-padded rows (masked cache slots)."""
    names = [s.name for s in LegacyDecodeGraph.INPUTS]
    feed = dict(zip(names, example_inputs(LegacyDecodeGraph.INPUTS, config, torch.float32, sizes, seed=seed), strict=True))  # fmt: skip
    mask = torch.ones_like(feed["attention_mask"])
    mask[:pad_rows, : sizes["past_sequence"] // 2] = 0  # padding, then filled slots
    mask[:, -2:] = 0  # unused slots of a preallocated buffer
    feed["attention_mask"] = mask
    return feed


def as_step_feed(feed: dict) -> dict:
    """The same call in the step graph's contract: the mask gains the new token's column,
    logits at its one position."""
    mask = feed["attention_mask"]
    ones = torch.ones((mask.shape[0], 1), dtype=mask.dtype)
    return {
        **feed,
        "attention_mask": torch.cat((mask, ones), dim=1),
        "logit_positions": torch.zeros(1, dtype=torch.int64),
    }


SHAPES = [
    {"batch": 1, "num_images": 1, "past_sequence": 3},
    {"batch": 3, "num_images": 2, "past_sequence": 17},
    {"batch": 2, "num_images": 1, "past_sequence": 130},
]


@pytest.mark.parametrize("semantics", ["hf", "meta"])
def test_one_new_token_is_the_old_decode_graph_bit_for_bit(tiny_model, tiny_model_meta, semantics):
    model = tiny_model if semantics == "hf" else tiny_model_meta
    old, new = LegacyDecodeGraph(model).eval(), DecodeGraph(model).eval()
    for seed, sizes in enumerate(SHAPES):
        feed = legacy_feed(model.config, sizes, seed)
        step = as_step_feed(feed)
        with torch.inference_mode():
            expected = old(*(feed[s.name] for s in LegacyDecodeGraph.INPUTS))
            got = new(*(step[s.name] for s in DecodeGraph.INPUTS))
        for name, a, b in zip(("logits", "new_key", "new_value"), got, expected, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, name
            assert torch.equal(a, b), f"{name} differs at {sizes}"


@pytest.fixture(scope="module")
def legacy_onnx(tiny_model, tmp_path_factory):
    """The old one-token decode graph exported from the same weights as ort_artifacts'."""
    folder = tmp_path_factory.mktemp("legacy-decode")
    options = BuildOptions(model="tiny", out=folder / "unused")
    export_graph(LegacyDecodeGraph(tiny_model), tiny_model.config, options, folder / "decode.onnx")
    return folder / "decode.onnx"


def test_one_new_token_is_the_old_decode_graph_bit_for_bit_in_onnxruntime(
    tiny_model, ort_artifacts, legacy_onnx
):
    """The exported step graph of the artifacts against the exported old graph: the same
    bits out of ONNX Runtime, at its default optimization level (graph fusions included)."""
    old = OnnxRuntimeBackend(legacy_onnx, LegacyDecodeGraph.INPUTS, LegacyDecodeGraph.OUTPUTS)
    new = OnnxRuntimeBackend(
        ort_artifacts / "onnx" / "decode.onnx", DecodeGraph.INPUTS, DecodeGraph.OUTPUTS
    )
    for seed, sizes in enumerate(SHAPES):
        feed = legacy_feed(tiny_model.config, sizes, seed + 10)
        expected = old.infer({k: v.numpy() for k, v in feed.items()})
        got = new.infer({k: v.numpy() for k, v in as_step_feed(feed).items()})
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name} {sizes}")


def test_new_tokens_continue_a_prefill_as_one_shot_prefill_computes_them(tiny_model):
    """A prompt's first k tokens by the prefill graph into a cache buffer, the other n by the
    step graph against it: the same logits and K/V as one-shot prefill of all k + n."""
    runner_feed = partial(prompt_feed, tiny_model.config)
    prompts = [[500, IMG, *range(20, 33)], [500, 40, 41, 42, 43, 44]]  # 15 and 6 tokens
    from conftest import random_images

    images = random_images(tiny_model.config, [[6], []], seed=2)
    feed = {k: torch.from_numpy(v) for k, v in runner_feed(prompts, images).items()}
    xk, xv = _cross_kv(tiny_model, images)
    s, k, cap = 15, 9, 20
    prefill, step = PrefillGraph(tiny_model).eval(), DecodeGraph(tiny_model).eval()
    with torch.inference_mode():
        every = torch.arange(s)
        full, pk, pv = prefill(*_prefill_args(feed, slice(0, s), xk, xv, every))
        _, head_k, head_v = prefill(*_prefill_args(feed, slice(0, k), xk, xv, every[:k]))
        past_k = torch.zeros((*head_k.shape[:3], cap, head_k.shape[4]))
        past_v = torch.zeros_like(past_k)
        past_k[:, :, :, :k], past_v[:, :, :, :k] = head_k, head_v
        mask = torch.zeros((2, cap + s - k), dtype=torch.int64)
        mask[:, :k] = feed["attention_mask"][:, :k]
        mask[:, cap:] = feed["attention_mask"][:, k:]
        logits, new_k, new_v = step(
            feed["input_ids"][:, k:], feed["position_ids"][:, k:], mask, past_k, past_v,
            feed["cross_attention_mask"][:, k:], xk, xv, torch.arange(s - k),
        )  # fmt: skip
    real = feed["attention_mask"][:, k:] != 0
    assert rel_l2(logits[real], full[:, k:][real]) < 1e-5
    assert rel_l2(new_k.transpose(2, 3)[:, real], pk[:, :, :, k:].transpose(2, 3)[:, real]) < 1e-5
    assert rel_l2(new_v.transpose(2, 3)[:, real], pv[:, :, :, k:].transpose(2, 3)[:, real]) < 1e-5


def _limits():
    from mllama_export.engines.runner import Limits

    return Limits(4, 256, 2)


def _prefill_args(feed, part, xk, xv, positions):
    names = ("input_ids", "position_ids", "attention_mask", "cross_attention_mask")
    return (*(feed[n][:, part] for n in names), xk, xv, positions)


def _cross_kv(model, images):
    from mllama_export.graphs.model import VisionGraph

    with torch.inference_mode():
        return VisionGraph(model).eval()(
            torch.from_numpy(images.pixel_values),
            torch.from_numpy(images.aspect_ratio_ids),
            torch.from_numpy(images.aspect_ratio_mask),
        )


# -- artifacts with the old decode graph --------------------------------------------------------


@pytest.fixture(scope="module")
def legacy_artifacts(ort_artifacts, legacy_onnx, tmp_path_factory):
    """ort_artifacts as an mllama-export of before the step graph wrote them: the old decode
    graph, and the manifest entry it recorded (inputs and outputs of one token)."""
    folder = tmp_path_factory.mktemp("legacy") / "tiny-hf"
    shutil.copytree(ort_artifacts, folder)
    shutil.copy(legacy_onnx, folder / "onnx" / "decode.onnx")
    shutil.copy(f"{legacy_onnx}.data", folder / "onnx" / "decode.onnx.data")
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["graphs"]["decode"]
    entry["weights"] = "onnx/decode.onnx.data"
    entry["inputs"] = [_spec_json(s, "float32") for s in LegacyDecodeGraph.INPUTS]
    entry["outputs"] = [_spec_json(s, "float32") for s in LegacyDecodeGraph.OUTPUTS]
    manifest.pop("files")
    write_manifest(folder, manifest)
    return folder


def test_artifacts_with_the_old_decode_graph_still_generate_the_same_tokens(
    ort_artifacts, legacy_artifacts
):
    from conftest import random_images

    legacy, current = Runner.from_artifacts(legacy_artifacts), Runner.from_artifacts(ort_artifacts)
    assert read_manifest(legacy_artifacts)["graphs"]["decode"]["inputs"][0]["dims"] == [
        "batch",
        "one",
    ]
    assert legacy.max_step_tokens() == 1 and current.max_step_tokens() is None
    prompts = [[500, IMG, 30, 31, 32, 33, 34], [500, IMG, IMG, 35]]
    images = random_images(legacy.config, [[6], [2, 3]], seed=5)
    kw = dict(max_new_tokens=10, stop_tokens=set(), keep_logits=True)
    old, new = (
        legacy.generate_ids(prompts, images, **kw),
        current.generate_ids(prompts, images, **kw),
    )
    assert old.token_ids == new.token_ids
    for a, b in zip(old.step_logits, new.step_logits, strict=True):
        np.testing.assert_array_equal(a, b)  # the same graph, the same bits
    # one token per call: chunks of 1 run, longer chunks are refused in one line
    ones = legacy.generate_ids(prompts, images, prefill_chunk=1, **kw)
    assert ones.token_ids == new.token_ids
    with pytest.raises(MllamaExportError, match="takes at most 1 new token"):
        legacy.generate_ids(prompts, images, prefill_chunk=4, **kw)
