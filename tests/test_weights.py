"""Checkpoint loading: strict, memory-mapped, never unpickling; the synthetic writer."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import preset
from mllama_export.graphs.synth import (
    parameter_shapes,
    random_state_dict,
    shard_plan,
    write_checkpoint,
)
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


def read_tensors(folder):
    """Our name -> tensor from every safetensors file of a folder, sorted by our name."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names = f.keys()
            tensors.update({our_name(n): f.get_tensor(n) for n in names})
    return dict(sorted(tensors.items()))


def values_digest(tensors):
    h = hashlib.sha256()
    for name, tensor in tensors.items():
        h.update(name.encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "seed, dtype, expected",
    [
        (0, torch.float32, "9b491d6162c834564b0ddd3fb60eff8ce34caca0d483486c45913e516ac4d7b7"),
        (3, torch.bfloat16, "0e65794e71f69231fd4e88dc8d049d5c433d8b7d6130de62ec9f0ebe1b8f964a"),
    ],
)
def test_synthetic_values_do_not_change(tmp_path, seed, dtype, expected):
    # Digests of what the writer produced before it streamed: the same seed, the same values.
    out = write_checkpoint(preset("tiny"), tmp_path, seed=seed, dtype=dtype, max_shard_bytes=10**5)
    assert values_digest(read_tensors(out)) == expected


def test_streamed_shards_hold_the_whole_state_dict(tmp_path):
    whole = random_state_dict(preset("tiny"), seed=3)
    one = read_tensors(write_checkpoint(preset("tiny"), tmp_path / "1", seed=3))
    many = read_tensors(write_checkpoint(preset("tiny"), tmp_path / "5", seed=3, shards=5))
    assert list(one) == list(many) == list(whole)
    for name, tensor in whole.items():
        assert torch.equal(one[name], tensor) and torch.equal(many[name], tensor), name


def test_max_shard_bytes_fills_shards_and_indexes_every_tensor(tmp_path, tiny_dir):
    limit = 200_000
    out = write_checkpoint(preset("tiny"), tmp_path, seed=0, max_shard_bytes=limit)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names = f.keys()
            sizes = [f.get_slice(n).get_shape() for n in names]
            stored.update(dict.fromkeys(names, file.name))
        nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
        assert nbytes <= limit or len(sizes) == 1, file.name
    assert index["weight_map"] == dict(sorted(stored.items()))
    total = sum(4 * s.numel() for s in parameter_shapes(preset("tiny")).values())
    assert index["metadata"]["total_size"] == total
    for a, b in zip(load_model(tiny_dir).parameters(), load_model(out).parameters(), strict=True):
        assert torch.equal(a, b)


def test_one_shard_has_no_index(tmp_path):
    out = write_checkpoint(preset("tiny"), tmp_path, max_shard_bytes=10**9)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_shard_plan():
    sizes = {"a": 10, "b": 50, "c": 10, "d": 10, "e": 10, "f": 10}
    assert shard_plan(sizes, max_shard_bytes=30) == [["a"], ["b"], ["c", "d", "e"], ["f"]]
    assert shard_plan(sizes, shards=2) == [["a", "b"], ["c", "d", "e", "f"]]
    assert shard_plan(sizes, shards=6) == [[n] for n in sizes]
    assert shard_plan({"a": 100, "b": 1, "c": 1}, shards=3) == [["a"], ["b"], ["c"]]
    with pytest.raises(MllamaExportError, match="one or the other"):
        shard_plan(sizes, shards=2, max_shard_bytes=30)
    with pytest.raises(MllamaExportError, match="between 1 and the 6 tensors"):
        shard_plan(sizes, shards=7)


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
            "is I32",
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
