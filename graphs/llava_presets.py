"""Named LLaVA configs: the llava-hf checkpoints' values, and tiny ones for tests and the README.

Each is the published 7B config changed by `dataclasses.replace`, so that a preset names only
what differs from the model it derives from.
"""

from __future__ import annotations

from dataclasses import replace

from mllama_export.errors import MllamaExportError

from .hf_config import RopeConfig
from .llava_config import ClipVisionConfig, LlavaConfig, LlavaTextConfig, validate_llava_config


def _presets() -> dict[str, LlavaConfig]:
    clip_l336 = ClipVisionConfig(
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        intermediate_size=4096,
        image_size=336,
        patch_size=14,
        num_channels=3,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    vicuna_7b = LlavaTextConfig(
        model_type="llama",
        vocab_size=32064,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        intermediate_size=11008,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0, kind="default"),
        max_position_embeddings=4096,
        sliding_window=None,
        bos_token_id=1,
        eos_token_ids=(2,),
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    vicuna_13b = replace(
        vicuna_7b,
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        intermediate_size=13824,
    )
    mistral_7b = replace(
        vicuna_7b,
        model_type="mistral",
        num_kv_heads=8,
        intermediate_size=14336,
        rope=RopeConfig(theta=1000000.0, kind="default"),
        max_position_embeddings=32768,
    )
    # Nous-Hermes-2-Yi-34B: Llama architecture, ChatML's <|im_end|> (7) ends a turn
    yi_34b = replace(
        vicuna_7b,
        vocab_size=64064,
        hidden_size=7168,
        num_layers=60,
        num_heads=56,
        num_kv_heads=8,
        intermediate_size=20480,
        rope=RopeConfig(theta=5000000.0, kind="default"),
        eos_token_ids=(7,),
        pad_token_id=0,
    )
    llava_7b = LlavaConfig(
        model_type="llava",
        vision=clip_l336,
        text=vicuna_7b,
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        image_seq_length=576,
        pad_token_id=32001,
    )
    next_mistral = replace(
        llava_7b,
        model_type="llava_next",
        text=mistral_7b,
        image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
        pad_token_id=None,
    )
    # Tiny ones: a few MB, yet every mechanism runs: GQA, a tower layer past the feature layer
    # (present in the checkpoint, never run), 4x4-patch tiles, the anyres grid and unpadding.
    clip_tiny = replace(
        clip_l336,
        hidden_size=32,
        num_layers=3,
        num_heads=2,
        intermediate_size=64,
        image_size=56,
        projection_dim=16,
    )
    text_tiny = replace(
        vicuna_7b,
        vocab_size=416,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=2048,
        bos_token_id=401,
        eos_token_ids=(402,),
    )
    tiny = replace(
        llava_7b,
        vision=clip_tiny,
        text=text_tiny,
        image_token_id=403,
        image_seq_length=16,
        pad_token_id=404,
    )
    next_tiny = replace(
        next_mistral,
        vision=clip_tiny,
        text=replace(text_tiny, model_type="mistral"),
        image_token_id=403,
        image_seq_length=16,
        image_grid_pinpoints=((56, 112), (112, 56), (112, 112), (168, 56), (56, 168)),
        pad_token_id=404,
    )
    return {
        "llava-tiny": tiny,
        "llava-next-tiny": next_tiny,
        "llava-1.5-7b": llava_7b,
        "llava-1.5-13b": replace(llava_7b, text=vicuna_13b),
        "llava-next-mistral-7b": next_mistral,
        "llava-next-vicuna-7b": replace(next_mistral, text=vicuna_7b),
        "llava-next-vicuna-13b": replace(next_mistral, text=vicuna_13b),
        "llava-next-34b": replace(next_mistral, text=yi_34b, image_token_id=64000),
    }


LLAVA_PRESETS: dict[str, LlavaConfig] = _presets()
# The family's "presets" part: name -> the config.json a checkpoint of it carries.
PRESETS: dict[str, dict] = {name: c.to_hf_dict() for name, c in LLAVA_PRESETS.items()}


def llava_preset(name: str) -> LlavaConfig:
    """A named LLaVA config: the llava-hf checkpoints' values, or a tiny one for tests."""
    if name not in LLAVA_PRESETS:
        raise MllamaExportError(f"unknown preset {name!r}; available: {', '.join(LLAVA_PRESETS)}")
    config = LLAVA_PRESETS[name]
    validate_llava_config(config)
    return config
