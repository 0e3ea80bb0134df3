"""LLaVA through the CLI as a user meets it: `synth` then `build` of both tiny presets (and a
shallower fp16 one), `inspect`; ONNX Runtime on the built graphs chained against our PyTorch
graphs on the same checkpoint; and the manifest. One build per preset and precision, shared by
the module. The refusals of `build` and `synth` are rows of the bad-input table
(tests/bad_inputs_llava.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from llava_cases import greedy, onnx_runner, random_tiles, rel_l2, torch_runner

from mllama_export.cli import main
from mllama_export.graphs.checkpoint import expected_shapes, load_model
from mllama_export.graphs.llava_contract import GRAPHS
from mllama_export.graphs.llava_layout import image_token_count
from mllama_export.graphs.llava_presets import llava_preset
from mllama_export.graphs.llava_synth import truncated

SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
# (preset, precision, synth options): both presets at fp32; fp16 on a shallower copy
BUILDS = {
    "llava-tiny": ("llava-tiny", "fp32", ()),
    "llava-next-tiny": ("llava-next-tiny", "fp32", ()),
    "llava-tiny-fp16": ("llava-tiny", "fp16", ("--text-layers", 2, "--vision-layers", 2)),
    "llava-next-fp8": ("llava-next-tiny", "fp8", ("--text-layers", 2, "--vision-layers", 2)),
}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("llava-build")


def build_once(root: Path, name: str) -> Path:
    """synth + build through the CLI, once per module."""
    out = root / name
    if not (out / "out" / "manifest.json").is_file():
        preset, precision, options = BUILDS[name]
        synth = cli("synth", "--preset", preset, "--out", out / "ckpt", "--seed", 5, *options)
        assert synth.exit_code == 0, synth.output
        build = cli(
            "build", "--model", out / "ckpt", "--out", out / "out", "--precision", precision,
            "--max-seq-len", 96, "--max-batch", 3,
        )  # fmt: skip
        assert build.exit_code == 0, build.output
    return out


@pytest.fixture(scope="module", params=["llava-tiny", "llava-next-tiny"])
def fp32(request, root):
    return build_once(root, request.param)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "out" / "manifest.json").read_text())


def test_the_manifest_holds_the_three_checked_graphs_and_the_side_files(fp32):
    m = manifest(fp32)
    config = json.loads((fp32 / "ckpt" / "config.json").read_text())
    assert m["model"]["config"] == config and m["precision"] == "fp32"
    assert list(m["graphs"]) == ["vision", "prefill", "decode"]
    for name, graph in m["graphs"].items():
        assert [i["name"] for i in graph["inputs"]] == list(GRAPHS[name].input_names)
        assert [o["name"] for o in graph["outputs"]] == list(GRAPHS[name].output_names)
        assert graph["check"]["ran"] and graph["check"]["depth"] == "full"
        assert max(o["rel_l2"] for o in graph["check"]["outputs"].values()) < 1e-5
    # prefill and decode share one text weight file, written once
    assert m["graphs"]["prefill"]["weights"] == m["graphs"]["decode"]["weights"]
    assert m["graphs"]["decode"]["weight_bytes_written"] == 0
    assert "xattn_mask" not in m["model"]  # Mllama's fields are Mllama's
    assert m["limits"] == {"max_batch": 3, "max_seq_len": 96, "max_images": 2}
    for side in SIDE_FILES:
        assert (fp32 / "out" / side).read_bytes() == (fp32 / "ckpt" / side).read_bytes(), side


def prompt(config, sizes, lengths, seed):
    """Token ids with each image's tokens expanded between text runs."""
    rng = np.random.default_rng(seed)
    ids = [config.text.bos_token_id] + rng.integers(2, 400, lengths[0]).tolist()
    for size, n in zip(sizes, lengths[1:], strict=True):
        ids += [config.image_token_id] * image_token_count(config, size)
        ids += rng.integers(2, 400, n).tolist()
    return ids


def test_onnxruntime_on_the_built_graphs_matches_our_pytorch_graphs(fp32):
    """A padded batch of 3 (two images, none, one; NeXT: portrait, landscape and a wide one,
    unpadded, each row closed by the newline), 8 greedy steps chained through the cache."""
    model = load_model(fp32 / "ckpt")
    config = model.config
    sizes = [[(90, 33), (40, 100)], [], [(20, 75)]]
    rows = [prompt(config, s, [3] + [2] * len(s), seed=i) for i, s in enumerate(sizes)]
    pixels = random_tiles(config, sizes, seed=7)
    tokens, logits = greedy(config, rows, sizes, pixels, onnx_runner(fp32 / "out" / "onnx"), 8)
    ref_tokens, ref_logits = greedy(config, rows, sizes, pixels, torch_runner(model), 8)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert max(rel_l2(a, b) for a, b in zip(logits, ref_logits, strict=True)) < 1e-5


def test_inspect_lists_the_graphs_and_checks_every_file(fp32):
    result = cli("inspect", fp32 / "out")
    assert result.exit_code == 0, result.output
    for name in GRAPHS:
        assert f"[{name}] onnx/{name}.onnx" in result.output
    assert "all match" in result.output


def test_a_shallower_fp16_build_is_checked_in_fp16(root):
    folder = build_once(root, "llava-tiny-fp16")
    m = manifest(folder)
    assert m["precision"] == "fp16" and m["io_dtype"] == "float16"
    assert m["model"]["config"]["text_config"]["num_hidden_layers"] == 2
    assert m["model"]["config"]["vision_config"]["num_hidden_layers"] == 2
    assert m["graphs"]["vision"]["inputs"][0]["dtype"] == "float16"
    for graph in m["graphs"].values():
        assert graph["check"]["ran"] and graph["check"]["limit_rel_l2"] == 3e-2


def test_truncated_keeps_the_first_layers_under_the_same_names():
    full = llava_preset("llava-1.5-7b")
    short = truncated(full, text_layers=2)
    assert (short.text.num_layers, short.vision.num_layers) == (2, 2)
    assert short.vision_feature_layer == -2 and short.vision_depth == 1
    kept, every = expected_shapes(short), expected_shapes(full)
    assert all(every[n] == s for n, s in kept.items())
    next_short = truncated(llava_preset("llava-next-mistral-7b"), 4, 10)
    assert (next_short.text.num_layers, next_short.vision.num_layers) == (4, 10)


def test_an_fp8_build_quantizes_the_decoders_linears_and_passes_the_gate(root):
    folder = build_once(root, "llava-next-fp8")
    m = manifest(folder)
    assert m["precision"] == "fp8"
    layers = m["quantization"]["layers"]
    config = json.loads((folder / "ckpt" / "config.json").read_text())
    per_layer = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(layers) == config["text_config"]["num_hidden_layers"] * len(per_layer)
    assert all(name.startswith("text.layers.") for name in layers)  # no --fp8-vision
    gate = cli("validate", folder / "out", "--reference", "transformers")
    assert gate.exit_code == 0, gate.output
    assert "PASS fp8" in gate.output
