"""Checkpoint loading: strict, memory-mapped, never unpickling; the synthetic writer."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import preset
from mllama_export.graphs.synth import write_checkpoint
from mllama_export.graphs.weights import WEIGHT_TABLE, load_model, our_name


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_synthetic_checkpoint_is_deterministic(tmp_path):
    a = write_checkpoint(preset("tiny"), tmp_path / "a", seed=3, shards=3)
    b = write_checkpoint(preset("tiny"), tmp_path / "b", seed=3, shards=3)
    c = write_checkpoint(preset("tiny"), tmp_path / "c", seed=4, shards=3)
    assert digest(a) == digest(b)
    assert (
        digest(a)["model-00001-of-00003.safetensors"]
        != digest(c)["model-00001-of-00003.safetensors"]
    )
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3


def test_sharded_and_single_file_load_the_same(tmp_path, tiny_dir):
    sharded = write_checkpoint(preset("tiny"), tmp_path / "s", seed=0, shards=4)
    one, many = load_model(tiny_dir), load_model(sharded)
    for (n, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_transformers_own_checkpoint_loads(tmp_path, tiny_hf):
    tiny_hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    ours = load_model(tmp_path / "hf")
    for name, tensor in tiny_hf.state_dict().items():
        mapped = our_name(name)
        assert mapped is not None, name
        assert torch.equal(ours.state_dict()[mapped], tensor), name


def copy_with(tiny_dir, tmp_path, mutate):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, out)
    tensors = load_file(out / "model.safetensors")
    mutate(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda t: t.pop("language_model.model.norm.weight"), "1 tensors missing"),
        (lambda t: t.update(extra=torch.zeros(1)), "1 unexpected"),
        (lambda t: t.update({"language_model.model.norm.weight": torch.ones(65)}), "shape [65]"),
        (
            lambda t: t.update(
                {"vision_model.class_embedding": torch.zeros(32, dtype=torch.int32)}
            ),
            "torch.int32",
        ),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_strict_loading(tiny_dir, tmp_path, mutate, expected):
    with pytest.raises(MllamaExportError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_model(copy_with(tiny_dir, tmp_path, mutate))


def test_pickled_weights_are_refused_unopened(tiny_dir, tmp_path):
    out = tmp_path / "pickled"
    out.mkdir()
    shutil.copy(tiny_dir / "config.json", out)
    (out / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(MllamaExportError, match="never unpickles"):
        load_model(out)


def test_corrupt_and_missing_shards(tiny_dir, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, out)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MllamaExportError, match="model.safetensors"):
        load_model(out)
    sharded = write_checkpoint(preset("tiny"), tmp_path / "sh", shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MllamaExportError, match="do not exist"):
        load_model(sharded)


def test_weight_table_maps_every_published_prefix():
    assert our_name("language_model.lm_head.weight") == "text.lm_head.weight"
    assert (
        our_name("model.language_model.layers.0.mlp.up_proj.weight")
        == "text.layers.0.mlp.up_proj.weight"
    )
    assert our_name("something.else") is None
    assert len({ours for _, ours in WEIGHT_TABLE}) == 4
