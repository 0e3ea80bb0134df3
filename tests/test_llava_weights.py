"""LLaVA checkpoint loading: strict, from the headers, every name spelling transformers writes;
the synthetic writer."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from llava_cases import built, greedy, hf_generate, random_tiles, torch_runner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.checkpoint import Checkpoint, expected_shapes, load_model
from mllama_export.graphs.llava_layout import image_token_count
from mllama_export.graphs.llava_presets import llava_preset
from mllama_export.graphs.llava_weights import checkpoint_name, our_name, unused_shapes
from mllama_export.graphs.synthetic import parameter_shapes, random_tensors, write_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def case(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


def stored_names(folder):
    names = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names += list(f.keys())
    return names


def test_transformers_own_checkpoint_loads_every_tensor(case):
    assert len(list(case.folder.glob("*.safetensors"))) > 3  # sharded, with an index
    ours = case.ours.state_dict()
    hf = {our_name(n): t for n, t in case.hf.state_dict().items()}
    assert set(ours) <= set(hf)
    for name, tensor in ours.items():
        assert torch.equal(tensor, hf[name]), name
    for name in stored_names(case.folder):
        mapped = our_name(name)
        assert mapped in ours or mapped in unused_shapes(case.config), name


def test_the_unused_tensors_are_the_ones_no_output_reads(case):
    unused = {our_name(n) for n in stored_names(case.folder)} - set(expected_shapes(case.config))
    depth = case.config.vision_depth
    assert {"vision.post_layernorm.weight", "vision.post_layernorm.bias"} <= unused
    assert all(
        n.startswith(("vision.post_layernorm.", f"vision.encoder.layers.{depth}")) for n in unused
    )


def test_in_memory_names_load_the_same(case, tmp_path):
    """A file written straight from transformers' state_dict() (model.language_model.*, ...)."""
    out = tmp_path / "state"
    out.mkdir()
    shutil.copy(case.folder / "config.json", out)
    state = {
        n: t.contiguous()
        for n, t in case.hf.state_dict().items()
        if n != "lm_head.weight" or not case.config.tied_lm_head
    }
    save_file(state, out / "model.safetensors")
    for (n, a), (_, b) in zip(
        load_model(out).state_dict().items(), case.ours.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), n


def test_blocks_stream_what_read_returns(case):
    checkpoint = Checkpoint(case.folder, case.config)
    name = "text.embed_tokens.weight"
    streamed = torch.cat(list(checkpoint.blocks(name, torch.float32)))
    assert torch.equal(streamed, checkpoint.read(name))


@pytest.mark.parametrize("name", ["llava-tiny", "llava-next-tiny"])
def test_transformers_loads_the_synthetic_checkpoint_and_agrees(name, tmp_path):
    config = llava_preset(name)
    folder = write_checkpoint(config, tmp_path, seed=1, shards=3)
    model_cls = (
        transformers.LlavaNextForConditionalGeneration
        if config.is_next
        else transformers.LlavaForConditionalGeneration
    )
    hf, info = model_cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sizes = [[(40, 90)]]
    rows = [
        [401, 7, 8] + [config.image_token_id] * image_token_count(config, sizes[0][0]) + [9, 10]
    ]
    pixels = random_tiles(config, sizes, 0)
    ours, _ = greedy(config, rows, sizes, pixels, torch_runner(load_model(folder)), 5)
    ref, _ = hf_generate(hf.eval(), config, rows, sizes, pixels, 5)
    assert (ours == ref).all()


def digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("model*"))
    }


def test_synthetic_checkpoint_is_deterministic_and_random_everywhere(tmp_path):
    config = llava_preset("llava-next-tiny")
    a = write_checkpoint(config, tmp_path / "a", seed=3, shards=3)
    b = write_checkpoint(config, tmp_path / "b", seed=3, shards=3)
    c = write_checkpoint(config, tmp_path / "c", seed=4, shards=3)
    assert digest(a) == digest(b) and digest(a) != digest(c)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert sorted(index["weight_map"]) == sorted(
        checkpoint_name(n) for n in parameter_shapes(config)
    )
    for name, tensor in random_tensors(config, seed=3):
        assert tensor.numel() < 2 or tensor.std() > 0.05, name  # no constant init left anywhere
    assert (
        "image_newline" in index["weight_map"]
        and "vision_tower.vision_model.post_layernorm.weight" in index["weight_map"]
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_checkpoint(llava_preset("llava-next-tiny"), tmp_path_factory.mktemp("tiny"))


def copy_with(tiny_dir, tmp_path, mutate):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, out)
    tensors = load_file(out / "model.safetensors")
    mutate(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


NORM = "language_model.model.norm.weight"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda t: t.pop(NORM), r"1 tensors missing \['language_model.model.norm.weight'\]"),
        (lambda t: t.pop("image_newline"), r"missing \['image_newline'\]"),
        (lambda t: t.update(extra=torch.zeros(1)), r"1 unexpected \['extra'\]"),
        (lambda t: t.update({NORM: torch.ones(65)}), r"shape \[65\]; the config implies \[64\]"),
        (
            lambda t: t.update({"vision_tower.vision_model.post_layernorm.bias": torch.ones(3)}),
            r"post_layernorm.bias has shape \[3\]",
        ),
        (lambda t: t.update({NORM: torch.ones(64, dtype=torch.int32)}), "is I32"),
        (
            lambda t: t.update({"model.language_model.norm.weight": t[NORM].clone()}),
            "stored twice under two spellings",
        ),
        (
            lambda t: t.update({"model.mm_projector.0.weight": torch.zeros(2)}),
            "convert_llava_weights_to_hf.py",
        ),
    ],
    ids=[
        "missing",
        "missing-newline",
        "unexpected",
        "shape",
        "unused-shape",
        "dtype",
        "twice",
        "original",
    ],
)
def test_strict_loading(tiny_dir, tmp_path, mutate, expected):
    with pytest.raises(MllamaExportError, match=expected):
        load_model(copy_with(tiny_dir, tmp_path, mutate))


def test_a_tower_layer_the_features_need_is_required(tiny_dir, tmp_path):
    used = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    with pytest.raises(MllamaExportError, match="1 tensors missing"):
        load_model(copy_with(tiny_dir, tmp_path, lambda t: t.pop(used)))
    unused = "vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight"  # past the feature layer
    assert load_model(copy_with(tiny_dir, tmp_path / "b", lambda t: t.pop(unused))) is not None


def test_corrupt_and_missing_shards(tiny_dir, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, out)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MllamaExportError, match="model.safetensors"):
        load_model(out)
    sharded = write_checkpoint(llava_preset("llava-tiny"), tmp_path / "sh", shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MllamaExportError, match="do not exist"):
        load_model(sharded)


def test_weight_table_maps_every_spelling():
    assert our_name("vision_tower.vision_model.pre_layrnorm.weight") == "vision.pre_layrnorm.weight"
    assert our_name("vision_tower.pre_layrnorm.weight") == "vision.pre_layrnorm.weight"
    assert our_name("model.vision_tower.pre_layrnorm.weight") == "vision.pre_layrnorm.weight"
    assert our_name("lm_head.weight") == our_name("language_model.lm_head.weight")
    assert our_name("model.image_newline") == "image_newline"
    assert our_name("something.else") is None
    assert (
        checkpoint_name("vision.embeddings.class_embedding")
        == "vision_tower.vision_model.embeddings.class_embedding"
    )
