"""Frozen model configuration for Llama 3.2 Vision, parsed strictly from a Hugging Face config.json."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
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
        image_token_id = top.take_int("image_token_index")
        top.take_optional("tie_word_embeddings", False, expect=False)
        top.finish()
        config = cls(vision=vision, text=text, image_token_id=image_token_id)
        _validate(config)
        return config

    @classmethod
    def from_hf_config(cls, path: str | Path) -> MllamaConfig:
        """Reads `config.json` from a checkpoint folder (or the file itself)."""
        path = Path(path)
        if not path.exists():
            raise MllamaExportError(
                f"{path} does not exist; expected a Hugging Face checkpoint folder with "
                "config.json (or the config.json itself)"
            )
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

    def take_int(self, key: str) -> int:
        return _number(self.name, key, self.take(key), int)

    def take_float(self, key: str) -> float:
        return _number(self.name, key, self.take(key), float)

    def take_ints(self, key: str) -> tuple[int, ...]:
        value = self.take(key)
        if not isinstance(value, list):
            raise MllamaExportError(f"{self.name}.{key} is {value!r}; expected a list of integers")
        return tuple(_number(self.name, key, v, int) for v in value)

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


def _number(section: str, key: str, value: Any, kind: type) -> Any:
    """An integer (or a number, for floats) from JSON; strings, booleans and floats with a
    fraction where an integer belongs are refused by name."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok:
        expected = "an integer" if kind is int else "a number"
        raise MllamaExportError(f"{section}.{key} is {value!r}; expected {expected}")
    return kind(value)


def _aspect_ratios_from(s: _Section) -> tuple[tuple[int, int], ...]:
    ratios = s.take("supported_aspect_ratios")
    ok = isinstance(ratios, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) for r in ratios
    )
    if not ok:
        raise MllamaExportError(
            f"{s.name}.supported_aspect_ratios is {json.dumps(ratios)[:80]}; expected a list "
            "of [tiles high, tiles wide] pairs of integers, e.g. [[1, 1], [1, 2]]"
        )
    return tuple((int(h), int(w)) for h, w in ratios)


def _vision_from_hf(s: _Section) -> VisionConfig:
    s.take_optional("model_type", "mllama_vision_model", expect="mllama_vision_model")
    s.take_optional("hidden_act", "gelu", expect="gelu")
    ratios = _aspect_ratios_from(s)
    config = VisionConfig(
        hidden_size=s.take_int("hidden_size"),
        num_layers=s.take_int("num_hidden_layers"),
        num_global_layers=s.take_int("num_global_layers"),
        num_heads=s.take_int("attention_heads"),
        intermediate_size=s.take_int("intermediate_size"),
        output_dim=s.take_int("vision_output_dim"),
        image_size=s.take_int("image_size"),
        patch_size=s.take_int("patch_size"),
        num_channels=s.take_int("num_channels"),
        max_num_tiles=s.take_int("max_num_tiles"),
        intermediate_layers=s.take_ints("intermediate_layers_indices"),
        supported_aspect_ratios=ratios,
        norm_eps=s.take_float("norm_eps"),
    )
    s.finish()
    return config


def _rope_from_hf(s: _Section) -> RopeConfig:
    # transformers 5.x writes `rope_parameters` (theta inside); published checkpoints carry the
    # 4.x pair `rope_theta` + `rope_scaling`, and 5.x in memory may add the theta to the latter.
    key = "rope_parameters" if "rope_parameters" in s.raw else "rope_scaling"
    params = s.take(key) or {"rope_type": "default"}
    if not isinstance(params, dict):
        raise MllamaExportError(
            f"text_config.{key} is {params!r}; expected an object such as "
            '{"rope_type": "llama3", "factor": 8.0, ...}'
        )
    params = dict(params)
    theta = params.pop("rope_theta", None)
    if theta is not None:
        theta = _number(f"text_config.{key}", "rope_theta", theta, float)
    if theta is None or "rope_theta" in s.raw:
        outer = s.take_float("rope_theta")
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
        factor=rope.take_float("factor"),
        low_freq_factor=rope.take_float("low_freq_factor"),
        high_freq_factor=rope.take_float("high_freq_factor"),
        original_max_position_embeddings=rope.take_int("original_max_position_embeddings"),
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
        vocab_size=s.take_int("vocab_size"),
        hidden_size=s.take_int("hidden_size"),
        num_layers=s.take_int("num_hidden_layers"),
        num_heads=s.take_int("num_attention_heads"),
        num_kv_heads=s.take_int("num_key_value_heads"),
        intermediate_size=s.take_int("intermediate_size"),
        cross_attention_layers=s.take_ints("cross_attention_layers"),
        rms_norm_eps=s.take_float("rms_norm_eps"),
        rope=_rope_from_hf(s),
        max_position_embeddings=s.take_int("max_position_embeddings"),
        bos_token_id=s.take_int("bos_token_id"),
        eos_token_ids=tuple(
            _number(s.name, "eos_token_id", e, int)
            for e in (eos if isinstance(eos, list) else [eos])
        ),
        pad_token_id=None if pad is None else _number(s.name, "pad_token_id", pad, int),
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


def truncated(
    config: MllamaConfig,
    text_layers: int,
    vision_layers: int,
    global_layers: int,
    cross_layers: tuple[int, ...] | None = None,
) -> MllamaConfig:
    """The same geometry with only the first layers of each stack.

    Layer i of the result is layer i of `config`, so a checkpoint of the result holds a subset
    of the original's tensors under the same names (with the default `cross_layers`, the
    original cross-attention layers below `text_layers`). The vision taps keep their count, so
    the projector keeps its shape; taps past the last kept layer read that layer instead.
    """
    t, v = config.text, config.vision
    _check_depth("text_layers", text_layers, t.num_layers)
    _check_depth("vision_layers", vision_layers, v.num_layers)
    _check_depth("global_layers", global_layers, v.num_global_layers)
    cross = _kept_cross_layers(t, text_layers, cross_layers)
    taps = tuple(min(i, vision_layers - 1) for i in v.intermediate_layers)
    result = MllamaConfig(
        vision=replace(
            v, num_layers=vision_layers, num_global_layers=global_layers, intermediate_layers=taps
        ),
        text=replace(t, num_layers=text_layers, cross_attention_layers=cross),
        image_token_id=config.image_token_id,
    )
    _validate(result)
    return result


def _check_depth(name: str, layers: int, original: int) -> None:
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= original:
        raise MllamaExportError(
            f"{name} {layers!r}: a truncated model keeps between 1 and the original {original} layers"
        )


def _kept_cross_layers(
    t: TextConfig, text_layers: int, cross_layers: tuple[int, ...] | None
) -> tuple[int, ...]:
    if cross_layers is None:
        cross = tuple(i for i in t.cross_attention_layers if i < text_layers)
    else:
        _check_cross_layers(cross_layers, text_layers)
        cross = tuple(sorted(cross_layers))
    if not cross:
        raise MllamaExportError(
            f"the first {text_layers} text layers hold no cross-attention layer (the original "
            f"ones are {list(t.cross_attention_layers)}); a Mllama decoder needs at least one: "
            "keep more text layers or name cross_layers"
        )
    if len(cross) == text_layers:
        # The prefill and decode graphs return the self-attention KV cache: it must not be empty.
        raise MllamaExportError(
            f"cross-attention layers {list(cross)} leave none of the {text_layers} text layers "
            "for self-attention; at least one is needed"
        )
    return cross


def _check_cross_layers(cross_layers: tuple[int, ...], text_layers: int) -> None:
    ints = all(isinstance(i, int) and not isinstance(i, bool) for i in cross_layers)
    if not ints or len(set(cross_layers)) != len(cross_layers) or not cross_layers:
        raise MllamaExportError(
            f"cross_layers {cross_layers!r}: expected one or more distinct integer layer indices"
        )
    if any(not 0 <= i < text_layers for i in cross_layers):
        raise MllamaExportError(
            f"cross_layers {list(cross_layers)}: each must be within 0..{text_layers - 1}, "
            f"the {text_layers} text layers kept"
        )


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
