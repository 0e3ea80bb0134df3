"""Frozen configuration for LLaVA 1.5 and LLaVA-NeXT, parsed strictly from a transformers config.json.

The format read is what transformers 5.x `save_pretrained` writes for `model_type` `llava` and
`llava_next` (a CLIP vision tower, a Llama or Mistral text model; Yi is Llama-architecture),
including the legacy keys that a re-saved llava-hf checkpoint carries. Unknown keys, missing keys
and features our graphs do not implement are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from mllama_export.errors import MllamaExportError

from .hf_config import RopeConfig, _number, _Section

LLAVA_MODEL_TYPES = ("llava", "llava_next")
TEXT_MODEL_TYPES = ("llama", "mistral")
FEATURE_STRATEGIES = ("default", "full")
# activations our projector implements, by transformers' ACT2FN names
PROJECTOR_ACTS = ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu")
VISION_ACTS = ("quick_gelu", "gelu")
ROPE_KINDS = ("default", "linear", "llama3")
# Keys of the original LLaVA repository (haotian-liu/LLaVA), whose checkpoints hold
# `model.mm_projector.*` and name their vision tower by a hub id instead of containing it.
ORIGINAL_FORMAT_KEYS = (
    "mm_vision_tower",
    "mm_projector_type",
    "mm_hidden_size",
    "mm_vision_tower_lr",
)
ORIGINAL_MODEL_TYPES = ("llava_llama", "llava_mistral", "llava_mpt")
ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM")


@dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int
    num_layers: int  # as the checkpoint holds them; only those up to the deepest feature layer run
    num_heads: int
    intermediate_size: int
    image_size: int  # side of one tile in pixels (336 in every published LLaVA)
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str
    projection_dim: int  # CLIP's contrastive head, absent from LLaVA checkpoints: kept for the file

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches along one side of a tile."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patches per tile plus the class token."""
        return self.grid**2 + 1


@dataclass(frozen=True)
class LlavaTextConfig:
    model_type: str  # "llama" (Llama 2, Vicuna, Yi) or "mistral": one decoder definition
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # explicit: Mistral-style configs may set it apart from hidden_size / heads
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    sliding_window: (
        int | None
    )  # Mistral: a token sees at most this many cache slots, itself included
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    tie_word_embeddings: bool


@dataclass(frozen=True)
class LlavaConfig:
    model_type: str  # "llava" (1.5) or "llava_next" (1.6, anyres)
    vision: ClipVisionConfig
    text: LlavaTextConfig
    image_token_id: int
    vision_feature_layer: int | tuple[int, ...]  # as config.json spells it: one index or a list
    vision_feature_select_strategy: str  # "default" drops the class token, "full" keeps it
    projector_hidden_act: str
    multimodal_projector_bias: bool
    tie_word_embeddings: bool
    image_seq_length: int  # informational in transformers 5.x; kept for the file
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # (height, width); LLaVA-NeXT only
    pad_token_id: int | None = None  # llava-hf 1.5 puts its <pad> here, not in text_config

    @property
    def is_next(self) -> bool:
        return self.model_type == "llava_next"

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Indices into CLIP's hidden states (0: the embeddings after pre-layernorm, i: the
        output of layer i), negatives resolved; the features of several are concatenated."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else layers
        n = self.vision.num_layers + 1
        return tuple(i % n for i in layers)

    @property
    def vision_depth(self) -> int:
        """Encoder layers that run: up to the deepest feature layer."""
        return max(self.feature_layers)

    @property
    def feature_dim(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)

    @property
    def tile_tokens(self) -> int:
        """Projected features per tile: every patch, plus the class token under 'full'."""
        return self.vision.grid**2 + (self.vision_feature_select_strategy == "full")

    # What code outside the family reads of a config (graphs/family.py FamilyConfig).
    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self.text.bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.text.eos_token_ids

    @property
    def tied_lm_head(self) -> bool:
        # transformers ties when either level says so (LlavaConfig.__post_init__)
        return self.tie_word_embeddings or self.text.tie_word_embeddings

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> LlavaConfig:
        _refuse_original_format(raw)
        try:
            config = _llava_from_hf(_Section("config.json", raw))
        except MllamaExportError as err:
            raise _with_version_hint(err, raw) from None
        validate_llava_config(config)
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers 5.x `save_pretrained` writes it for this model."""
        layer = self.vision_feature_layer
        raw: dict[str, Any] = {
            "architectures": [
                "LlavaNextForConditionalGeneration"
                if self.is_next
                else "LlavaForConditionalGeneration"
            ],
            "dtype": "float16",
            "image_seq_length": self.image_seq_length,
            "image_token_index": self.image_token_id,
            "model_type": self.model_type,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "projector_hidden_act": self.projector_hidden_act,
            "text_config": _text_to_hf(self.text),
            "tie_word_embeddings": self.tie_word_embeddings,
            "transformers_version": "5.24.0",
            "vision_config": _vision_to_hf(self.vision),
            "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
        }
        if self.is_next:
            raw["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        if self.pad_token_id is not None:
            raw["pad_token_id"] = self.pad_token_id
        return dict(sorted(raw.items()))


def _refuse_original_format(raw: dict[str, Any]) -> None:
    found = [f"{k}={raw[k]!r}" for k in ("model_type",) if raw.get(k) in ORIGINAL_MODEL_TYPES]
    found += [a for a in raw.get("architectures") or [] if a in ORIGINAL_ARCHITECTURES]
    found += [k for k in ORIGINAL_FORMAT_KEYS if k in raw]
    if not found:
        return
    script = (
        "llava_next/convert_llava_next_weights_to_hf.py"
        if raw.get("image_aspect_ratio") == "anyres" or "v1.6" in str(raw.get("_name_or_path"))
        else "llava/convert_llava_weights_to_hf.py"
    )
    # That format names its vision tower by a hub id instead of holding its weights.
    tower = f"vision tower {raw['mm_vision_tower']!r} by name, " if "mm_vision_tower" in raw else ""
    raise MllamaExportError(
        f"config.json is the original LLaVA repository's format ({', '.join(found)}; "
        f"{tower}mm_projector weights); expected the llava-hf layout (model_type 'llava' or "
        f"'llava_next'): convert it with transformers' src/transformers/models/{script} first"
    )


def _with_version_hint(err: MllamaExportError, raw: dict[str, Any]) -> MllamaExportError:
    version = str(raw.get("transformers_version", ""))
    if "is missing the key" not in str(err) or not version.startswith(("3.", "4.")):
        return err
    return MllamaExportError(
        f"{err}; this config.json was written by transformers {version}, which leaves out "
        "default values: re-save it with transformers 5 (AutoConfig.from_pretrained(folder)"
        ".save_pretrained(folder)) so that every value is spelled out"
    )


def _llava_from_hf(top: _Section) -> LlavaConfig:
    model_type = top.take("model_type")
    if model_type not in LLAVA_MODEL_TYPES:
        raise MllamaExportError(
            f"config.json has model_type {model_type!r}; expected one of {list(LLAVA_MODEL_TYPES)} "
            "(a LLaVA checkpoint such as llava-hf/llava-1.5-7b-hf or llava-v1.6-mistral-7b-hf)"
        )
    text = _text_from_hf(_Section("text_config", top.take("text_config")))
    vision = _vision_from_hf(_Section("vision_config", top.take("vision_config")))
    _legacy_keys(top, text, model_type)
    pinpoints = _pinpoints(top) if model_type == "llava_next" else ()
    pad = top.take_optional("pad_token_id", None)
    config = LlavaConfig(
        model_type=model_type,
        vision=vision,
        text=text,
        image_token_id=top.take_int("image_token_index"),
        vision_feature_layer=_feature_layer(top),
        vision_feature_select_strategy=_choice(
            top, "vision_feature_select_strategy", FEATURE_STRATEGIES
        ),
        projector_hidden_act=_choice(top, "projector_hidden_act", PROJECTOR_ACTS),
        multimodal_projector_bias=_bool(top, "multimodal_projector_bias"),
        tie_word_embeddings=_bool(top, "tie_word_embeddings"),
        image_seq_length=top.take_int("image_seq_length"),
        image_grid_pinpoints=pinpoints,
        pad_token_id=None if pad is None else _number(top.name, "pad_token_id", pad, int),
    )
    top.finish()
    return config


def _legacy_keys(top: _Section, text: LlavaTextConfig, model_type: str) -> None:
    """Keys of the llava-hf conversions (transformers 4.x) that a re-saved config keeps."""
    top.take_optional("ignore_index", -100)  # the training loss's label padding
    legacy_vocab = top.take_optional("vocab_size", text.vocab_size)
    if legacy_vocab != text.vocab_size:
        raise MllamaExportError(
            f"config.json has vocab_size {legacy_vocab!r} but text_config.vocab_size "
            f"{text.vocab_size}; expected the two to agree"
        )
    if model_type == "llava_next":
        top.take_optional("use_image_newline_parameter", True, expect=True)


def _bool(s: _Section, key: str) -> bool:
    value = s.take(key)
    if not isinstance(value, bool):
        raise MllamaExportError(f"{s.name}.{key} is {value!r}; expected true or false")
    return value


def _choice(s: _Section, key: str, choices: tuple[str, ...]) -> str:
    value = s.take(key)
    if value not in choices:
        raise MllamaExportError(
            f"{s.name}.{key} is {value!r}; mllama-export supports {list(choices)}"
        )
    return value


def _optional_int(s: _Section, key: str) -> int | None:
    value = s.take(key)
    return None if value is None else _number(s.name, key, value, int)


def _feature_layer(s: _Section) -> int | tuple[int, ...]:
    value = s.take("vision_feature_layer")
    if isinstance(value, list) and value:
        return tuple(_number(s.name, "vision_feature_layer", v, int) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise MllamaExportError(
        f"config.json.vision_feature_layer is {value!r}; expected an integer (e.g. -2) or a "
        "non-empty list of integers"
    )


def _pinpoints(s: _Section) -> tuple[tuple[int, int], ...]:
    value = s.take("image_grid_pinpoints")
    ok = isinstance(value, list) and value
    ok = ok and all(
        isinstance(p, list)
        and len(p) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p)
        for p in value
    )
    if not ok:
        raise MllamaExportError(
            f"config.json.image_grid_pinpoints is {json.dumps(value)[:80]}; expected a non-empty "
            "list of [height, width] pairs of positive integers, e.g. [[336, 672], [672, 336]]"
        )
    return tuple((h, w) for h, w in value)


def _vision_from_hf(s: _Section) -> ClipVisionConfig:
    s.take_optional("model_type", "clip_vision_model", expect="clip_vision_model")
    s.take_optional("attention_dropout", 0.0)  # training only
    s.take_optional("initializer_factor", 1.0)  # initialization only
    s.take_optional("vocab_size", None)  # a leftover of the llava-hf conversion, never read
    config = ClipVisionConfig(
        hidden_size=s.take_int("hidden_size"),
        num_layers=s.take_int("num_hidden_layers"),
        num_heads=s.take_int("num_attention_heads"),
        intermediate_size=s.take_int("intermediate_size"),
        image_size=s.take_int("image_size"),
        patch_size=s.take_int("patch_size"),
        num_channels=s.take_int("num_channels"),
        layer_norm_eps=s.take_float("layer_norm_eps"),
        hidden_act=_choice(s, "hidden_act", VISION_ACTS),
        projection_dim=s.take_int("projection_dim"),
    )
    s.finish()
    return config


def _text_from_hf(s: _Section) -> LlavaTextConfig:
    model_type = _choice(s, "model_type", TEXT_MODEL_TYPES)
    s.take_optional("hidden_act", "silu", expect="silu")
    s.take_optional("attention_dropout", 0.0)  # training only
    sliding_window = None
    if model_type == "llama":
        s.take_optional("attention_bias", False, expect=False)
        s.take_optional("mlp_bias", False, expect=False)
        s.take_optional("pretraining_tp", 1)  # transformers 5.x no longer reads it
    else:
        sliding_window = _optional_int(s, "sliding_window")
    hidden, heads = s.take_int("hidden_size"), s.take_int("num_attention_heads")
    head_dim = _optional_int(s, "head_dim")
    eos = s.take("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    config = LlavaTextConfig(
        model_type=model_type,
        vocab_size=s.take_int("vocab_size"),
        hidden_size=hidden,
        num_layers=s.take_int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=s.take_int("num_key_value_heads"),
        head_dim=head_dim or hidden // max(heads, 1),
        intermediate_size=s.take_int("intermediate_size"),
        rms_norm_eps=s.take_float("rms_norm_eps"),
        rope=_rope_from_hf(s),
        max_position_embeddings=s.take_int("max_position_embeddings"),
        sliding_window=sliding_window,
        bos_token_id=_optional_int(s, "bos_token_id"),
        eos_token_ids=tuple(_number(s.name, "eos_token_id", e, int) for e in eos),
        pad_token_id=_optional_int(s, "pad_token_id"),
        tie_word_embeddings=_bool(s, "tie_word_embeddings"),
    )
    s.finish()
    return config


def _rope_from_hf(s: _Section) -> RopeConfig:
    # transformers 5.x writes `rope_parameters` with the theta inside; 4.x wrote `rope_theta`
    # beside an optional `rope_scaling`.
    if "rope_parameters" in s.raw:
        params = s.take("rope_parameters")
        if not isinstance(params, dict):
            raise MllamaExportError(
                f"text_config.rope_parameters is {params!r}; expected an object such as "
                '{"rope_type": "default", "rope_theta": 10000.0}'
            )
        rope = _Section("text_config.rope_parameters", dict(params))
        theta = rope.take_float("rope_theta")
    else:
        theta = s.take_float("rope_theta")
        rope = _Section("text_config.rope_scaling", s.take_optional("rope_scaling", None) or {})
    kind = rope.take_optional("rope_type", None) or rope.take_optional("type", "default")
    if kind not in ROPE_KINDS:
        raise MllamaExportError(
            f"rope type {kind!r} is not supported; expected one of {list(ROPE_KINDS)} (dynamic "
            "scaling changes with the sequence length, which an exported graph cannot follow)"
        )
    rope.take_optional("partial_rotary_factor", 1.0, expect=1.0)
    config = RopeConfig(theta=theta, kind=kind)
    if kind == "linear":
        config = replace(config, factor=rope.take_float("factor"))
    elif kind == "llama3":
        config = replace(
            config,
            factor=rope.take_float("factor"),
            low_freq_factor=rope.take_float("low_freq_factor"),
            high_freq_factor=rope.take_float("high_freq_factor"),
            original_max_position_embeddings=rope.take_int("original_max_position_embeddings"),
        )
    rope.finish()
    return config


def _vision_to_hf(v: ClipVisionConfig) -> dict[str, Any]:
    return {
        "attention_dropout": 0.0,
        "hidden_act": v.hidden_act,
        "hidden_size": v.hidden_size,
        "image_size": v.image_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": v.intermediate_size,
        "layer_norm_eps": v.layer_norm_eps,
        "model_type": "clip_vision_model",
        "num_attention_heads": v.num_heads,
        "num_channels": v.num_channels,
        "num_hidden_layers": v.num_layers,
        "patch_size": v.patch_size,
        "projection_dim": v.projection_dim,
    }


def _rope_to_hf(r: RopeConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": r.theta, "rope_type": r.kind}
    if r.kind != "default":
        params["factor"] = r.factor
    if r.kind == "llama3":
        params.update(
            low_freq_factor=r.low_freq_factor,
            high_freq_factor=r.high_freq_factor,
            original_max_position_embeddings=r.original_max_position_embeddings,
        )
    return params


def _text_to_hf(t: LlavaTextConfig) -> dict[str, Any]:
    eos = t.eos_token_ids[0] if len(t.eos_token_ids) == 1 else list(t.eos_token_ids) or None
    raw: dict[str, Any] = {
        "attention_dropout": 0.0,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": eos,
        "head_dim": t.head_dim,
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "model_type": t.model_type,
        "num_attention_heads": t.num_heads,
        "num_hidden_layers": t.num_layers,
        "num_key_value_heads": t.num_kv_heads,
        "pad_token_id": t.pad_token_id,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": _rope_to_hf(t.rope),
        "tie_word_embeddings": t.tie_word_embeddings,
        "use_cache": True,
        "vocab_size": t.vocab_size,
    }
    if t.model_type == "llama":
        raw.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        raw["sliding_window"] = t.sliding_window
    return dict(sorted(raw.items()))


def validate_llava_config(c: LlavaConfig) -> None:
    """Sizes that must agree with each other; one line naming every disagreement."""
    problems = _vision_problems(c) + _text_problems(c)
    if problems:
        raise MllamaExportError("inconsistent config.json: " + "; ".join(problems))


def _vision_problems(c: LlavaConfig) -> list[str]:
    v, problems = c.vision, []
    if v.hidden_size % v.num_heads:
        problems.append(
            f"vision hidden_size {v.hidden_size} is not divisible by {v.num_heads} heads"
        )
    if v.image_size % v.patch_size:
        problems.append(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    layer = c.vision_feature_layer
    n = v.num_layers
    if any(not -(n + 1) <= i <= n for i in ((layer,) if isinstance(layer, int) else layer)):
        problems.append(f"vision_feature_layer {layer} outside -{n + 1}..{n}")
    if any(h % v.image_size or w % v.image_size for h, w in c.image_grid_pinpoints):
        problems.append(
            f"image_grid_pinpoints {[list(p) for p in c.image_grid_pinpoints]} are not all "
            f"multiples of the {v.image_size}-pixel tile"
        )
    if c.is_next and c.vision_feature_select_strategy == "full":
        # transformers' pack_image_features reshapes each tile to a grid of patches, which a
        # kept class token breaks (it fails or scrambles the features): refused, not copied
        problems.append("vision_feature_select_strategy 'full' cannot lay out anyres tiles")
    return problems


def _text_problems(c: LlavaConfig) -> list[str]:
    t, problems = c.text, []
    if t.num_heads % t.num_kv_heads:
        problems.append(
            f"{t.num_heads} attention heads do not divide into {t.num_kv_heads} KV heads"
        )
    if t.head_dim % 2:
        problems.append(f"head_dim {t.head_dim} is odd; rope rotates pairs of dimensions")
    if not 0 <= c.image_token_id < t.vocab_size:
        problems.append(
            f"image_token_index {c.image_token_id} is outside the {t.vocab_size} embeddings"
        )
    if t.sliding_window is not None and t.sliding_window < 1:
        problems.append(f"sliding_window {t.sliding_window} must be at least 1")
    return problems
