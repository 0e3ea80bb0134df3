"""The generic checkpoint, synthesis and build path for a family that declares only a model, a
name table and a one-graph contract (no check, fp8, profiles or build part): written, read
strictly, loaded, exported and checked against PyTorch through the same modules as Mllama."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mllama_export.errors import MllamaExportError
from mllama_export.exporter.buildplan import plan_build
from mllama_export.exporter.check import whole_model_check
from mllama_export.exporter.options import BuildOptions
from mllama_export.exporter.streaming import StreamingExport
from mllama_export.exporter.verify import Reference, check_graphs
from mllama_export.graphs import family as registry
from mllama_export.graphs.checkpoint import Checkpoint, CheckpointFormat, load_model
from mllama_export.graphs.spec import GraphSpec, TensorSpec
from mllama_export.graphs.synthetic import random_state_dict, write_checkpoint


@dataclass(frozen=True)
class LmConfig:
    vocab_size: int = 40
    hidden_size: int = 12
    bos_token_id: int = 1
    pad_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (2,)

    @classmethod
    def from_hf_dict(cls, raw: dict) -> LmConfig:
        return cls(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"])

    def to_hf_dict(self) -> dict:
        return {"model_type": "generic_lm", "vocab_size": self.vocab_size, "hidden_size": 12}


LM = GraphSpec(
    "lm",
    (
        TensorSpec("input_ids", "int64", ("batch", "sequence"), "token ids"),
        TensorSpec("attention_mask", "int64", ("batch", "sequence"), "1: a token"),
    ),
    (TensorSpec("logits", "model", ("batch", "sequence", "vocab"), "next-token logits"),),
    "lm.onnx.data",
)


class LmModel(nn.Module):
    def __init__(self, config: LmConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class LmGraph(nn.Module):
    SPEC = LM
    INPUTS, OUTPUTS = LM.inputs, LM.outputs

    def __init__(self, model: LmModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        # input_ids, attention_mask: [B, S] -> logits: [B, S, V]
        x = self.model.embed(input_ids) * attention_mask[..., None].to(self.model.head.weight.dtype)
        return self.model.head(self.model.norm(torch.cumsum(x, dim=1)))


@pytest.fixture
def family(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    contract = types.SimpleNamespace(
        GRAPHS={"lm": LM},
        DYNAMIC_DIMS=("batch", "sequence"),
        static_dims=lambda c: {"vocab": c.vocab_size},
    )
    parts = {
        "config": LmConfig,
        "presets": {"generic-lm-tiny": LmConfig().to_hf_dict()},
        "contract": contract,
        "graph_modules": {"lm": LmGraph},
        "model": LmModel,
        "checkpoint_format": CheckpointFormat((("model.", ""),), 1, "the generic LM"),
        "checkpoint": Checkpoint,
        "load_model": load_model,
        "synth": write_checkpoint,
    }
    return registry.register(registry.Family("generic", "generic LM", ("generic_lm",), parts))


def test_written_under_the_published_names_read_strictly_and_loaded(family, tmp_path):
    folder = write_checkpoint(LmConfig(), tmp_path / "ckpt", seed=4, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["model.embed.weight", "model.head.weight",
                                           "model.norm.bias", "model.norm.weight"]  # fmt: skip
    model = load_model(folder)
    assert isinstance(model, LmModel) and Checkpoint(folder, LmConfig()).family is family
    for name, tensor in random_state_dict(LmConfig(), seed=4).items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_tensor_outside_the_model_is_refused_by_name(family, tmp_path):
    folder = write_checkpoint(LmConfig(), tmp_path / "ckpt", seed=0)
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "model.extra.weight": torch.ones(2)}, folder / "model.safetensors")
    with pytest.raises(MllamaExportError, match=r"1 unexpected \['model.extra.weight'\]; "
                       "expected exactly the tensors of the generic LM"):  # fmt: skip
        Checkpoint(folder, LmConfig())


def test_exported_and_checked_on_the_whole_model(family, tmp_path):
    folder = write_checkpoint(LmConfig(), tmp_path / "ckpt", seed=1)
    options = BuildOptions(model=str(folder), out=tmp_path / "out", max_seq_len=16)
    plan = whole_model_check(family, options, LmConfig())
    assert plan.depth == "full" and plan.estimate is None and set(plan.cases) == {"lm"}
    (tmp_path / "onnx").mkdir()
    written = StreamingExport(Checkpoint(folder, LmConfig()), options).export_all(tmp_path / "onnx")
    assert written["lm"]["weight_bytes_written"] > 0
    reference = Reference(model=load_model(folder))
    checks = check_graphs(reference, tmp_path / "onnx", LmConfig(), options, plan.cases)
    assert checks["lm"]["ran"] and checks["lm"]["outputs"]["logits"]["rel_l2"] < 1e-5


def test_fp8_and_a_reduced_check_are_refused_in_one_line(family, tmp_path):
    folder = write_checkpoint(LmConfig(), tmp_path / "ckpt", seed=1)
    fp8 = BuildOptions(model=str(folder), out=tmp_path / "a", precision="fp8")
    with pytest.raises(MllamaExportError, match="the generic LM family has no FP8 build"):
        plan_build(fp8, tmp_path / "a")
    reduced = BuildOptions(model=str(folder), out=tmp_path / "b", check_depth="reduced")
    with pytest.raises(MllamaExportError, match="the generic LM family has no reduced copy"):
        plan_build(reduced, tmp_path / "b")
