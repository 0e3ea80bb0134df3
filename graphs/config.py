"""Frozen model configuration for Llama 3.2 Vision, parsed strictly from a Hugging Face config.json."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mllama_export.errors import MllamaExportError

from . import strict
from .hf_config import GENERIC_HF_KEYS, RopeConfig

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
        raw = strict.require_object("config.json", raw)
        if "model_type" in raw and raw["model_type"] != "mllama":
            raise MllamaExportError(
                f"config.json has model_type {raw.get('model_type')!r}; expected 'mllama' "
                "(a Llama 3.2 Vision checkpoint such as meta-llama/Llama-3.2-11B-Vision)"
            )
        top = _read("config.json", raw, _TOP_KEYS)
        config = cls(
            vision=_vision_from_hf(top["vision_config"]),
            text=_text_from_hf(top["text_config"]),
            image_token_id=top["image_token_index"],
        )
        _validate(config)
        return config

    @classmethod
    def from_hf_config(cls, path: str | Path) -> MllamaConfig:
        """Reads `config.json` from a checkpoint folder (or the file itself)."""
        from .family import read_config_json

        return cls.from_hf_dict(read_config_json(path))

    # What every family's config answers (graphs/family.py FamilyConfig).
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.text.eos_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self.text.pad_token_id

    @property
    def bos_token_id(self) -> int:
        return self.text.bos_token_id

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a published checkpoint carries for this model."""
        return {
            "architectures": ["MllamaForConditionalGeneration"],
            "model_type": "mllama",
            "image_token_index": self.image_token_id,
            "torch_dtype": "bfloat16",
            "vision_config": strict.write(_VISION_KEYS, self.vision),
            "text_config": strict.write(_TEXT_KEYS, self.text),
        }


def _read(where: str, raw: Any, keys: tuple[strict.Key, ...]) -> dict[str, Any]:
    note = " (and PretrainedConfig's generic keys, which this version ignores)"
    return strict.read(where, raw, keys, ignore=GENERIC_HF_KEYS, note=note)


def _only(value: Any) -> strict.Check:
    """A key with one supported value: accepted when absent, refused when different."""
    return strict.one_of(value, why=", the only value mllama-export supports")


def _aspect_ratios(ratios: Any) -> tuple[tuple[int, int], ...]:
    ok = isinstance(ratios, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) for r in ratios
    )
    if not ok:
        raise strict.Wrong(
            "a list of [tiles high, tiles wide] pairs of integers, e.g. [[1, 1], [1, 2]]"
        )
    return tuple((int(h), int(w)) for h, w in ratios)


def _token_ids(value: Any) -> tuple[int, ...]:
    """HF writes one eos id as an integer, several as a list."""
    items = value if isinstance(value, list) else [value]
    try:
        return tuple(strict.integer()(v) for v in items)
    except strict.Wrong:
        raise strict.Wrong("an integer or a list of integers") from None


def _eos_json(ids: tuple[int, ...]) -> int | list[int]:
    return ids[0] if len(ids) == 1 else list(ids)


_INT, _FLOAT, Key = strict.integer(), strict.number(), strict.Key
_SIZE = strict.integer(minimum=1)  # a width, a head count or a divisor: 0 would divide by 0

_TOP_KEYS = (
    Key("model_type", _only("mllama")),
    Key("vision_config", strict.obj),
    Key("text_config", strict.obj),
    Key("image_token_index", _INT),
    Key("tie_word_embeddings", _only(False), default=False),
)

# Each section's HF key <-> field table, read by from_hf_dict and written by to_hf_dict in this
# order (the order published config.json files have). Keys without a field are constants.
_VISION_KEYS = (
    Key("model_type", _only("mllama_vision_model"), default="mllama_vision_model"),
    Key("hidden_size", _SIZE, attr="hidden_size"),
    Key("hidden_act", _only("gelu"), default="gelu"),
    Key("num_hidden_layers", _INT, attr="num_layers"),
    Key("num_global_layers", _INT, attr="num_global_layers"),
    Key("attention_heads", _SIZE, attr="num_heads"),
    Key("num_channels", _SIZE, attr="num_channels"),
    Key("intermediate_size", _SIZE, attr="intermediate_size"),
    Key("vision_output_dim", _INT, attr="output_dim"),
    Key("image_size", _SIZE, attr="image_size"),
    Key("patch_size", _SIZE, attr="patch_size"),
    Key("norm_eps", _FLOAT, attr="norm_eps"),
    Key("max_num_tiles", _SIZE, attr="max_num_tiles"),
    Key("intermediate_layers_indices", strict.integers, attr="intermediate_layers"),
    Key("supported_aspect_ratios", _aspect_ratios, attr="supported_aspect_ratios"),
)

_LLAMA3_ROPE_KEYS = (
    Key("factor", _FLOAT, attr="factor"),
    Key("low_freq_factor", _FLOAT, attr="low_freq_factor"),
    Key("high_freq_factor", _FLOAT, attr="high_freq_factor"),
    Key("original_max_position_embeddings", _INT, attr="original_max_position_embeddings"),
)


def _rope_json(rope: RopeConfig) -> dict[str, Any]:
    extra = strict.write(_LLAMA3_ROPE_KEYS, rope) if rope.kind == "llama3" else {}
    return {"rope_type": rope.kind, **extra}


_TEXT_KEYS = (
    Key("model_type", _only("mllama_text_model"), default="mllama_text_model"),
    Key("vocab_size", _SIZE, attr="vocab_size"),
    Key("hidden_size", _SIZE, attr="hidden_size"),
    Key("hidden_act", _only("silu"), default="silu"),
    Key("num_hidden_layers", _INT, attr="num_layers"),
    Key("num_attention_heads", _SIZE, attr="num_heads"),
    Key("num_key_value_heads", _SIZE, attr="num_kv_heads"),
    Key("intermediate_size", _SIZE, attr="intermediate_size"),
    # The rope keys are read together by _rope_from_hf: either may hold the theta.
    Key("rope_theta", strict.anything, default=None, attr="rope", dump=lambda r: r.theta),
    Key("rope_scaling", strict.anything, default=None, attr="rope", dump=_rope_json),
    Key("rope_parameters", strict.anything, default=None, written=False),
    Key("rms_norm_eps", _FLOAT, attr="rms_norm_eps"),
    Key("max_position_embeddings", _INT, attr="max_position_embeddings"),
    Key("tie_word_embeddings", _only(False), default=False),
    Key("cross_attention_layers", strict.integers, attr="cross_attention_layers"),
    Key("dropout", strict.anything, default=0.0),  # training only
    Key("bos_token_id", _INT, attr="bos_token_id"),
    Key("eos_token_id", _token_ids, attr="eos_token_ids", dump=_eos_json),
    Key("pad_token_id", strict.nullable(_INT), attr="pad_token_id"),
)


def _vision_from_hf(raw: Any) -> VisionConfig:
    return VisionConfig(**strict.fields(_VISION_KEYS, _read("vision_config", raw, _VISION_KEYS)))


def _text_from_hf(raw: Any) -> TextConfig:
    values = _read("text_config", raw, _TEXT_KEYS)
    return TextConfig(**{**strict.fields(_TEXT_KEYS, values), "rope": _rope_from_hf(raw)})


def _rope_from_hf(raw: dict[str, Any]) -> RopeConfig:
    # transformers 5.x writes `rope_parameters` (theta inside); published checkpoints carry the
    # 4.x pair `rope_theta` + `rope_scaling`, and 5.x in memory may add the theta to the latter.
    key = "rope_parameters" if "rope_parameters" in raw else "rope_scaling"
    if key == "rope_parameters" and "rope_scaling" in raw:
        raise MllamaExportError(
            "text_config has both rope_parameters and rope_scaling; expected one of them"
        )
    if key not in raw:
        raise strict.missing("text_config", raw, [key])
    params = raw[key] or {"rope_type": "default"}
    if not isinstance(params, dict):
        example = '{"rope_type": "llama3", "factor": 8.0, ...}'
        raise strict.wrong(f"text_config.{key}", params, f"an object such as {example}")
    theta = _rope_theta(raw, key, params)
    where = f"text_config.{key}"
    names = [Key("rope_type", strict.anything, default=None)]
    if not params.get("rope_type"):
        names.append(Key("type", strict.anything))  # the older spelling
    named = strict.read(where, params, names, others=True)
    kind = named["rope_type"] or named.get("type")
    if kind not in ("default", "llama3"):
        raise MllamaExportError(
            f"rope type {kind!r} is not supported; expected 'llama3' or 'default'"
        )
    extra = _LLAMA3_ROPE_KEYS if kind == "llama3" else ()
    keys = (*names, Key("rope_theta", strict.anything, default=None), *extra)
    values = _read(where, params, keys)
    return RopeConfig(theta=theta, kind=kind, **strict.fields(extra, values))


def _rope_theta(raw: dict[str, Any], key: str, params: dict[str, Any]) -> float:
    optional = Key("rope_theta", strict.nullable(_FLOAT), default=None)
    inner = strict.read(f"text_config.{key}", params, (optional,), others=True)["rope_theta"]
    if inner is not None and "rope_theta" not in raw:
        return inner
    outer = strict.read("text_config", raw, (Key("rope_theta", _FLOAT),), others=True)["rope_theta"]
    if inner is not None and inner != outer:
        raise MllamaExportError(f"text_config has two rope thetas, {outer} and {inner}")
    return outer


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


_11B = MllamaConfig(
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
)

# Small enough for tests in seconds, yet every mechanism of the real model is exercised: GQA, all 8
# aspect ratios, padded patches (17 -> 24), two intermediate taps, all three rope bands.
_TINY = MllamaConfig(
    vision=replace(
        _11B.vision,
        hidden_size=32,
        num_layers=4,
        num_global_layers=2,
        num_heads=2,
        intermediate_size=64,
        output_dim=96,
        image_size=56,
        intermediate_layers=(1, 3),
    ),
    text=replace(
        _11B.text,
        vocab_size=512,
        hidden_size=64,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        cross_attention_layers=(1, 4),
        bos_token_id=500,
        eos_token_ids=(501, 505, 506),
        pad_token_id=504,
    ),
    image_token_id=512,
)
_90B = replace(
    _11B,
    text=replace(
        _11B.text,
        hidden_size=8192,
        num_layers=100,
        num_heads=64,
        intermediate_size=28672,
        cross_attention_layers=tuple(range(3, 100, 5)),
    ),
)

# The config.json of each preset, as a checkpoint of it carries.
PRESETS: dict[str, dict[str, Any]] = {
    name: config.to_hf_dict() for name, config in (("tiny", _TINY), ("11b", _11B), ("90b", _90B))
}


def preset(name: str) -> MllamaConfig:
    """The config of a named preset: `tiny` for tests, `11b` and `90b` with the published values."""
    if name not in PRESETS:
        raise MllamaExportError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return MllamaConfig.from_hf_dict(copy.deepcopy(PRESETS[name]))
