"""Frozen model configuration for Llama 3.2 Vision, parsed strictly from a Hugging Face config.json."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllama_export.errors import MllamaExportError

# PretrainedConfig's serialization and generation defaults. transformers 4.x writes all of them into
# every sub-config of a checkpoint (the published Llama 3.2 Vision config.json has them); none of
# them changes the architecture, so they are accepted and ignored. Anything not listed is an error.
GENERIC_HF_KEYS = frozenset(
    [
        "_name_or_path",
        "add_cross_attention",
        "architectures",
        "bad_words_ids",
        "begin_suppress_tokens",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "diversity_penalty",
        "do_sample",
        "dtype",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "finetuning_task",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "id2label",
        "initializer_range",
        "is_decoder",
        "is_encoder_decoder",
        "label2id",
        "length_penalty",
        "max_length",
        "min_length",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "prefix",
        "problem_type",
        "pruned_heads",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict",
        "return_dict_in_generate",
        "sep_token_id",
        "suppress_tokens",
        "task_specific_params",
        "temperature",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tokenizer_class",
        "top_k",
        "top_p",
        "torch_dtype",
        "torchscript",
        "transformers_version",
        "typical_p",
        "use_bfloat16",
        "use_cache",
    ]
)

DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_layers: int  # local transformer, the one with intermediate taps
    num_global_layers: int  # gated transformer that sees all tiles at once
    num_heads: int
    intermediate_size: int
    output_dim: int  # hidden_size * (1 + len(intermediate_layers)): final + tapped states
    image_size: int  # side of one tile in pixels
    patch_size: int
    num_channels: int
    max_num_tiles: int
    intermediate_layers: tuple[int, ...]
    supported_aspect_ratios: tuple[tuple[int, int], ...]
    norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        """Patches per tile plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_patches(self) -> int:
        """The encoder pads each tile's sequence to a multiple of 8, as the reference does."""
        return -(-self.num_patches // 8) * 8

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 0


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int  # lm_head rows; the embedding has 8 more (the image token lives there)
    hidden_size: int
    num_layers: int  # self- and cross-attention layers together
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    cross_attention_layers: tuple[int, ...]
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + 8

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        cross = set(self.cross_attention_layers)
        return tuple(i for i in range(self.num_layers) if i not in cross)


@dataclass(frozen=True)
class MllamaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_id: int

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> MllamaConfig:
        top = _Section("config.json", raw)
        if top.take("model_type") != "mllama":
            raise MllamaExportError(
                f"config.json has model_type {raw.get('model_type')!r}; expected 'mllama' "
                "(a Llama 3.2 Vision checkpoint such as meta-llama/Llama-3.2-11B-Vision)"
            )
        vision = _vision_from_hf(_Section("vision_config", top.take("vision_config")))
        text = _text_from_hf(_Section("text_config", top.take("text_config")))
        image_token_id = int(top.take("image_token_index"))
        top.take_optional("tie_word_embeddings", False, expect=False)
        top.finish()
        config = cls(vision=vision, text=text, image_token_id=image_token_id)
        _validate(config)
        return config

    @classmethod
    def from_hf_config(cls, path: str | Path) -> MllamaConfig:
        """Reads `config.json` from a checkpoint folder (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise MllamaExportError(f"no config.json at {file}; expected a Hugging Face checkpoint")
        try:
            raw = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MllamaExportError(f"cannot read {file}: {err}; expected a JSON object") from err
        if not isinstance(raw, dict):
            raise MllamaExportError(f"{file} holds {type(raw).__name__}; expected a JSON object")
        return cls.from_hf_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a published checkpoint carries for this model."""
        v, t = self.vision, self.text
        rope: dict[str, Any] = {"rope_type": t.rope.kind}
        if t.rope.kind == "llama3":
            rope.update(
                factor=t.rope.factor,
                low_freq_factor=t.rope.low_freq_factor,
                high_freq_factor=t.rope.high_freq_factor,
                original_max_position_embeddings=t.rope.original_max_position_embeddings,
            )
        eos = t.eos_token_ids[0] if len(t.eos_token_ids) == 1 else list(t.eos_token_ids)
        return {
            "architectures": ["MllamaForConditionalGeneration"],
            "model_type": "mllama",
            "image_token_index": self.image_token_id,
            "torch_dtype": "bfloat16",
            "vision_config": {
                "model_type": "mllama_vision_model",
                "hidden_size": v.hidden_size,
                "hidden_act": "gelu",
                "num_hidden_layers": v.num_layers,
                "num_global_layers": v.num_global_layers,
                "attention_heads": v.num_heads,
                "num_channels": v.num_channels,
                "intermediate_size": v.intermediate_size,
                "vision_output_dim": v.output_dim,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "norm_eps": v.norm_eps,
                "max_num_tiles": v.max_num_tiles,
                "intermediate_layers_indices": list(v.intermediate_layers),
                "supported_aspect_ratios": [list(r) for r in v.supported_aspect_ratios],
            },
            "text_config": {
                "model_type": "mllama_text_model",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "hidden_act": "silu",
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads,
                "intermediate_size": t.intermediate_size,
                "rope_theta": t.rope.theta,
                "rope_scaling": rope,
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "tie_word_embeddings": False,
                "cross_attention_layers": list(t.cross_attention_layers),
                "dropout": 0.0,
                "bos_token_id": t.bos_token_id,
                "eos_token_id": eos,
                "pad_token_id": t.pad_token_id,
            },
        }


class _Section:
    """One JSON object read key by key, so that keys nobody took can be reported."""

    def __init__(self, name: str, raw: Any):
        if not isinstance(raw, dict):
            raise MllamaExportError(f"{name} must be a JSON object, got {type(raw).__name__}")
        self.name, self.raw, self.taken = name, raw, set()

    def take(self, key: str) -> Any:
        if key not in self.raw:
            raise MllamaExportError(
                f"{self.name} is missing the key {key!r}; keys present: {', '.join(sorted(self.raw))}"
            )
        self.taken.add(key)
        return self.raw[key]

    def take_optional(self, key: str, default: Any, expect: Any = None) -> Any:
        value = self.raw.get(key, default)
        self.taken.add(key)
        if expect is not None and value != expect:
            raise MllamaExportError(
                f"{self.name}.{key} is {value!r}; mllama-export supports only {expect!r}"
            )
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.taken - GENERIC_HF_KEYS)
        if unknown:
            raise MllamaExportError(
                f"{self.name} has unknown keys {unknown}; this version understands "
                f"{sorted(self.taken)} and ignores PretrainedConfig's generic keys"
            )


def _vision_from_hf(s: _Section) -> VisionConfig:
    s.take_optional("model_type", "mllama_vision_model", expect="mllama_vision_model")
    s.take_optional("hidden_act", "gelu", expect="gelu")
    ratios = s.take("supported_aspect_ratios")
    config = VisionConfig(
        hidden_size=int(s.take("hidden_size")),
        num_layers=int(s.take("num_hidden_layers")),
        num_global_layers=int(s.take("num_global_layers")),
        num_heads=int(s.take("attention_heads")),
        intermediate_size=int(s.take("intermediate_size")),
        output_dim=int(s.take("vision_output_dim")),
        image_size=int(s.take("image_size")),
        patch_size=int(s.take("patch_size")),
        num_channels=int(s.take("num_channels")),
        max_num_tiles=int(s.take("max_num_tiles")),
        intermediate_layers=tuple(int(i) for i in s.take("intermediate_layers_indices")),
        supported_aspect_ratios=tuple((int(h), int(w)) for h, w in ratios),
        norm_eps=float(s.take("norm_eps")),
    )
    s.finish()
    return config


def _rope_from_hf(s: _Section) -> RopeConfig:
    # transformers 5.x writes `rope_parameters` (theta inside); published checkpoints carry the
    # 4.x pair `rope_theta` + `rope_scaling`, and 5.x in memory may add the theta to the latter.
    key = "rope_parameters" if "rope_parameters" in s.raw else "rope_scaling"
    params = dict(s.take(key) or {"rope_type": "default"})
    theta = params.pop("rope_theta", None)
    if theta is None or "rope_theta" in s.raw:
        outer = s.take("rope_theta")
        if theta is not None and float(theta) != float(outer):
            raise MllamaExportError(f"text_config has two rope thetas, {outer} and {theta}")
        theta = outer
    rope = _Section(f"text_config.{key}", params)
    kind = rope.take_optional("rope_type", None) or rope.take("type")
    if kind == "default":
        rope.finish()
        return RopeConfig(theta=float(theta), kind="default")
    if kind != "llama3":
        raise MllamaExportError(
            f"rope type {kind!r} is not supported; expected 'llama3' or 'default'"
        )
    config = RopeConfig(
        theta=float(theta),
        kind="llama3",
        factor=float(rope.take("factor")),
        low_freq_factor=float(rope.take("low_freq_factor")),
        high_freq_factor=float(rope.take("high_freq_factor")),
        original_max_position_embeddings=int(rope.take("original_max_position_embeddings")),
    )
    rope.finish()
    return config


def _text_from_hf(s: _Section) -> TextConfig:
    s.take_optional("model_type", "mllama_text_model", expect="mllama_text_model")
    s.take_optional("hidden_act", "silu", expect="silu")
    s.take_optional("tie_word_embeddings", False, expect=False)
    s.take_optional("dropout", 0.0)  # training only
    eos = s.take("eos_token_id")
    pad = s.take("pad_token_id")
    config = TextConfig(
        vocab_size=int(s.take("vocab_size")),
        hidden_size=int(s.take("hidden_size")),
        num_layers=int(s.take("num_hidden_layers")),
        num_heads=int(s.take("num_attention_heads")),
        num_kv_heads=int(s.take("num_key_value_heads")),
        intermediate_size=int(s.take("intermediate_size")),
        cross_attention_layers=tuple(int(i) for i in s.take("cross_attention_layers")),
        rms_norm_eps=float(s.take("rms_norm_eps")),
        rope=_rope_from_hf(s),
        max_position_embeddings=int(s.take("max_position_embeddings")),
        bos_token_id=int(s.take("bos_token_id")),
        eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])),
        pad_token_id=None if pad is None else int(pad),
    )
    s.finish()
    return config


def _validate(c: MllamaConfig) -> None:
    v, t = c.vision, c.text
    problems = []
    if v.hidden_size % v.num_heads:
        problems.append(
            f"vision hidden_size {v.hidden_size} is not divisible by {v.num_heads} heads"
        )
    if v.image_size % v.patch_size:
        problems.append(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    if v.output_dim != v.hidden_size * (1 + len(v.intermediate_layers)):
        problems.append(
            f"vision_output_dim {v.output_dim} != hidden_size {v.hidden_size} x "
            f"(1 + {len(v.intermediate_layers)} intermediate layers)"
        )
    if any(not 0 <= i < v.num_layers for i in v.intermediate_layers):
        problems.append(
            f"intermediate_layers_indices {list(v.intermediate_layers)} outside 0..{v.num_layers - 1}"
        )
    if any(h * w > v.max_num_tiles for h, w in v.supported_aspect_ratios):
        problems.append(
            f"an aspect ratio in {v.supported_aspect_ratios} needs more than {v.max_num_tiles} tiles"
        )
    if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
        problems.append(
            f"text heads {t.num_heads}/{t.num_kv_heads} do not divide hidden {t.hidden_size}"
        )
    if any(not 0 <= i < t.num_layers for i in t.cross_attention_layers):
        problems.append(
            f"cross_attention_layers {list(t.cross_attention_layers)} outside 0..{t.num_layers - 1}"
        )
    if not t.vocab_size <= c.image_token_id < t.embedding_rows:
        problems.append(
            f"image_token_index {c.image_token_id} is not among the 8 rows past vocab_size"
        )
    if problems:
        raise MllamaExportError("inconsistent config.json: " + "; ".join(problems))


def _aspect_ratios(max_tiles: int) -> list[list[int]]:
    return [
        [h, w]
        for h in range(1, max_tiles + 1)
        for w in range(1, max_tiles + 1)
        if h * w <= max_tiles
    ]


_11B_HF: dict[str, Any] = MllamaConfig(
    vision=VisionConfig(
        hidden_size=1280,
        num_layers=32,
        num_global_layers=8,
        num_heads=16,
        intermediate_size=5120,
        output_dim=7680,
        image_size=560,
        patch_size=14,
        num_channels=3,
        max_num_tiles=4,
        intermediate_layers=(3, 7, 15, 23, 30),
        supported_aspect_ratios=DEFAULT_ASPECT_RATIOS,
        norm_eps=1e-5,
    ),
    text=TextConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=40,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        cross_attention_layers=(3, 8, 13, 18, 23, 28, 33, 38),
        rms_norm_eps=1e-5,
        rope=RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        pad_token_id=128004,
    ),
    image_token_id=128256,
).to_hf_dict()


def _preset_dicts() -> dict[str, dict[str, Any]]:
    b90 = copy.deepcopy(_11B_HF)
    b90["text_config"].update(
        hidden_size=8192,
        num_hidden_layers=100,
        num_attention_heads=64,
        intermediate_size=28672,
        cross_attention_layers=list(range(3, 100, 5)),
    )
    tiny = copy.deepcopy(_11B_HF)
    # Small enough for tests in seconds, yet every mechanism of the real model is exercised: GQA,
    # all 8 aspect ratios, padded patches (17 -> 24), two intermediate taps, all three rope bands.
    tiny["image_token_index"] = 512
    tiny["vision_config"].update(
        hidden_size=32,
        num_hidden_layers=4,
        num_global_layers=2,
        attention_heads=2,
        intermediate_size=64,
        vision_output_dim=96,
        image_size=56,
        intermediate_layers_indices=[1, 3],
    )
    tiny["text_config"].update(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        cross_attention_layers=[1, 4],
        bos_token_id=500,
        eos_token_id=[501, 505, 506],
        pad_token_id=504,
    )
    return {"tiny": tiny, "11b": copy.deepcopy(_11B_HF), "90b": b90}


PRESETS: dict[str, dict[str, Any]] = _preset_dicts()


def preset(name: str) -> MllamaConfig:
    """The config of a named preset: `tiny` for tests, `11b` and `90b` with the published values."""
    if name not in PRESETS:
        raise MllamaExportError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return MllamaConfig.from_hf_dict(copy.deepcopy(PRESETS[name]))
