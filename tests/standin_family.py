"""A stand-in second family: a text-only causal decoder exported as ONE graph, `lm`.

Issue 17's proof that a family plugs in from its own files: this module declares the family's
config, contract, model, graph, session and evaluation set, registers it, and nothing outside it
names it. tests/test_second_family.py then builds, runs and validates it through the same
commands as Mllama. The graph has no cache: each step reruns the whole sequence, which is the
simplest session a family can have.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from mllama_export.errors import MllamaExportError
from mllama_export.graphs import strict
from mllama_export.graphs.checkpoint import Checkpoint, CheckpointFormat, load_model
from mllama_export.graphs.family import Family
from mllama_export.graphs.spec import GraphSpec, TensorSpec, check_forward
from mllama_export.graphs.synthetic import write_checkpoint

MODEL_TYPE = "standin_lm"
_SIZE, Key = strict.integer(minimum=1), strict.Key


@dataclass(frozen=True)
class StandinConfig:
    vocab_size: int
    hidden_size: int
    num_heads: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> StandinConfig:
        return cls(**strict.fields(_KEYS, strict.read("config.json", raw, _KEYS)))

    def to_hf_dict(self) -> dict[str, Any]:
        return strict.write(_KEYS, self)


_KEYS = (
    Key("model_type", strict.one_of(MODEL_TYPE), default=MODEL_TYPE),
    Key("vocab_size", _SIZE, attr="vocab_size"),
    Key("hidden_size", _SIZE, attr="hidden_size"),
    Key("num_attention_heads", _SIZE, attr="num_heads"),
    Key("bos_token_id", strict.integer(), attr="bos_token_id"),
    Key("eos_token_id", strict.integers, attr="eos_token_ids"),
    Key("pad_token_id", strict.nullable(strict.integer()), attr="pad_token_id"),
)
PRESETS = {
    "standin-tiny": {
        "model_type": MODEL_TYPE,
        "vocab_size": 64,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "bos_token_id": 1,
        "eos_token_id": [2],
        "pad_token_id": 0,
    }
}


def _s(name: str, dtype: str, dims: str, doc: str) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims.split()), doc)


LM = GraphSpec(
    "lm",
    (
        _s("input_ids", "int64", "batch sequence", "token ids, left-padded"),
        _s("attention_mask", "int64", "batch sequence", "1 for a real token, 0 for padding"),
    ),
    (_s("logits", "model", "batch sequence vocab", "next-token logits at every position"),),
    "lm.onnx.data",
)
CONTRACT = SimpleNamespace(
    GRAPHS={"lm": LM},
    DYNAMIC_DIMS=("batch", "sequence"),
    static_dims=lambda config: {"vocab": config.vocab_size},
)


class StandinModel(nn.Module):
    """Embedding, one causal self-attention block with an MLP, lm_head: every weight."""

    def __init__(self, config: StandinConfig):
        super().__init__()
        d, v = config.hidden_size, config.vocab_size
        self.config, self.heads = config, config.num_heads
        self.embed, self.qkv, self.out = nn.Embedding(v, d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm, self.lm_head = nn.LayerNorm(d), nn.Linear(d, v, bias=False)


class LMGraph(nn.Module):
    SPEC = LM
    INPUTS, OUTPUTS = LM.inputs, LM.outputs

    def __init__(self, model: StandinModel):
        super().__init__()
        self.m = model
        check_forward(self, self.INPUTS)

    def forward(self, input_ids, attention_mask):
        # input_ids, attention_mask: [B, S] -> logits: [B, S, V]
        m, (b, s) = self.m, input_ids.shape
        x = m.embed(input_ids)
        q, k, v = m.qkv(x).view(b, s, 3, m.heads, -1).permute(2, 0, 3, 1, 4)
        pos = torch.arange(s, device=input_ids.device)
        causal = pos[None, :] <= pos[:, None]
        # a padded row still sees itself, so that no softmax row is empty
        allowed = causal & (attention_mask[:, None, None, :] > 0) | (pos[None, :] == pos[:, None])
        att = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + m.out(att.transpose(1, 2).reshape(b, s, -1))
        x = x + m.mlp(m.norm(x))
        return m.lm_head(m.norm(x))


class Inputs:
    """Token ids only (no tokenizer, no images): the checks are the vocabulary and the limits."""

    def __init__(self, config: StandinConfig, limits=None):
        self.config, self.limits, self.tokenizer, self.image_config = config, limits, None, None

    @classmethod
    def for_config(cls, config, limits=None, tokenizer=None, image_config=None) -> Inputs:
        return cls(config, limits)

    @classmethod
    def from_folder(cls, folder, config, limits=None) -> Inputs:
        return cls(config, limits)

    def need_tokenizer(self):
        raise MllamaExportError("the stand-in family takes token ids only (--token-ids)")

    def encode(self, prompt=None, images=(), *, token_ids=None, ids_name="", images_name=""):
        if images:
            raise MllamaExportError(f"the stand-in family takes no {images_name or 'images'}")
        if token_ids is None:
            self.need_tokenizer()
        self.check_request([list(token_ids)], None, 1)
        return list(token_ids), None

    def check_request(self, prompts, images, max_new_tokens) -> None:
        vocab = self.config.vocab_size
        if images is not None or not prompts or not all(prompts):
            raise MllamaExportError("expected one or more non-empty token-id prompts, no images")
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise MllamaExportError(f"token ids outside the vocabulary; expected 0..{vocab - 1}")
        if self.limits and max(map(len, prompts)) + max_new_tokens > self.limits.max_seq_len:
            raise MllamaExportError(f"built for {self.limits.max_seq_len} tokens in all")


class Session:
    """No cache: the prompt, then every step, reruns the whole (left-padded) sequence."""

    def __init__(self, config, backends, limits, store, dtype):
        self.lm, self.pad, self.store = backends["lm"], config.pad_token_id or 0, store

    def start(self, prompts, images, max_new_tokens, keep_logits, prefill_chunk, result):
        if prefill_chunk is not None:
            raise MllamaExportError("the stand-in family prefills in one call")
        s = max(map(len, prompts))
        self.ids = np.full((len(prompts), s), self.pad, np.int64)
        self.mask = np.zeros_like(self.ids)
        for row, prompt in enumerate(prompts):
            self.ids[row, s - len(prompt) :], self.mask[row, s - len(prompt) :] = prompt, 1
        logits = self._logits()
        if keep_logits:
            result.prefill_logits, result.prompt_mask = logits, self.mask.copy()
        return logits[:, -1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.ids = np.concatenate([self.ids, tokens[:, None].astype(np.int64)], axis=1)
        self.mask = np.concatenate([self.mask, np.ones_like(self.ids[:, :1])], axis=1)
        return self._logits()[:, -1]

    def _logits(self) -> np.ndarray:
        out = self.lm.infer({"input_ids": self.ids, "attention_mask": self.mask})
        return self.store.host(out["logits"])


@dataclass(eq=False)
class Case:
    name: str
    prompts: list[list[int]]
    images: None = None


def build_evalset(config, limits=None, steps: int = 8, seed: int = 0) -> list[Case]:
    """A single prompt and a left-padded batch, random ids that fit the limits."""
    rng = np.random.default_rng(seed)
    longest = min(12, (limits.max_seq_len if limits else 64) - steps - 1)
    rows = min(3, limits.max_batch if limits else 3)
    ids = lambda n: rng.integers(3, config.vocab_size, n).tolist()  # noqa: E731
    return [
        Case("single", [ids(longest)]),
        Case("padded", [ids(longest - 3 * r) for r in range(rows)]),
    ]


EVALSET = SimpleNamespace(
    build_evalset=build_evalset,
    case_stages=lambda case: (),
    traced_stages=lambda case, config, first: {},
)

FAMILY = Family(
    name="standin",
    title="stand-in text-only decoder",
    model_types=(MODEL_TYPE,),
    parts={
        "config": StandinConfig,
        "presets": PRESETS,
        "contract": CONTRACT,
        "graph_modules": {"lm": LMGraph},
        "model": StandinModel,
        "checkpoint_format": CheckpointFormat((("model.", ""),), 1, "the stand-in decoder"),
        "checkpoint": Checkpoint,
        "load_model": load_model,
        "synth": write_checkpoint,
        "inputs": Inputs,
        "session": Session,
        "evalset": EVALSET,
    },
)
