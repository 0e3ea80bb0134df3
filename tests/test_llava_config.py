"""LlavaConfig: presets with the llava-hf values, strict parsing of what transformers 5.x writes."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.family import load_config
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_model import LlavaModel
from mllama_export.graphs.llava_presets import LLAVA_PRESETS, llava_preset

transformers = pytest.importorskip("transformers")


def test_llava_15_7b_has_the_published_values():
    c = llava_preset("llava-1.5-7b")
    v, t = c.vision, c.text
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size, v.patch_size, v.hidden_act) == (336, 14, "quick_gelu")
    assert (t.model_type, t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads) == (
        "llama",
        4096,
        32,
        32,
        32,
    )
    assert (t.intermediate_size, t.vocab_size, t.max_position_embeddings) == (11008, 32064, 4096)
    assert (c.image_token_id, c.pad_token_id, c.feature_layers, c.vision_depth) == (
        32000,
        32001,
        (23,),
        23,
    )
    assert (c.tile_tokens, c.feature_dim, c.tied_lm_head) == (576, 1024, False)


def test_llava_next_presets_have_the_published_values():
    mistral, yi = llava_preset("llava-next-mistral-7b"), llava_preset("llava-next-34b")
    assert mistral.image_grid_pinpoints == (
        (336, 672),
        (672, 336),
        (672, 672),
        (1008, 336),
        (336, 1008),
    )
    t = mistral.text
    assert (t.model_type, t.num_kv_heads, t.intermediate_size, t.rope.theta) == (
        "mistral",
        8,
        14336,
        1e6,
    )
    assert (t.max_position_embeddings, t.sliding_window) == (32768, None)
    t = yi.text
    assert (t.model_type, t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads) == (
        "llama",
        7168,
        60,
        56,
        8,
    )
    assert (t.intermediate_size, t.vocab_size, t.rope.theta, yi.image_token_id) == (
        20480,
        64064,
        5e6,
        64000,
    )
    assert llava_preset("llava-next-vicuna-13b").text == llava_preset("llava-1.5-13b").text


@pytest.mark.parametrize("name", ["llava-tiny", "llava-next-tiny"])
def test_tiny_presets_are_a_few_megabytes(name):
    with torch.device("meta"):
        params = sum(p.numel() for p in LlavaModel(llava_preset(name)).parameters())
    assert params * 4 < 4 << 20


@pytest.mark.parametrize("name", list(LLAVA_PRESETS))
def test_presets_round_trip_through_transformers(name, tmp_path):
    config = llava_preset(name)
    raw = config.to_hf_dict()
    cls = transformers.LlavaNextConfig if config.is_next else transformers.LlavaConfig
    cls(**copy.deepcopy(raw)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == raw
    assert load_config(tmp_path) == config


def test_a_resaved_llava_hf_config_with_its_legacy_keys_is_accepted(tmp_path):
    """llava-hf/llava-1.5-7b-hf's config.json (written by transformers 4.36), re-saved by 5.x."""
    hub = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 32000,
        "model_type": "llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }
    (tmp_path / "config.json").write_text(json.dumps(hub))
    with pytest.raises(
        MllamaExportError, match=r"missing the key 'hidden_size'.*transformers 4\.36.*re-save"
    ):
        load_config(tmp_path)
    transformers.AutoConfig.from_pretrained(tmp_path).save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert {"ignore_index", "vocab_size", "pad_token_id"} <= set(resaved)
    assert LlavaConfig.from_hf_dict(resaved) == llava_preset("llava-1.5-7b")


def test_text_level_tie_ties_the_head():
    raw = llava_preset("llava-tiny").to_hf_dict()
    raw["text_config"]["tie_word_embeddings"] = True
    config = LlavaConfig.from_hf_dict(raw)
    assert config.tied_lm_head and not config.tie_word_embeddings
    with torch.device("meta"):
        assert "text.lm_head.weight" not in LlavaModel(config).state_dict()


def bad(name: str, mutate) -> str:
    raw = copy.deepcopy(llava_preset(name).to_hf_dict())
    mutate(raw)
    with pytest.raises(MllamaExportError) as err:
        LlavaConfig.from_hf_dict(raw)
    assert "\n" not in str(err.value)
    return str(err.value)


def text(**kw):
    return lambda r: r["text_config"].update(kw)


def vision(**kw):
    return lambda r: r["vision_config"].update(kw)


def top(**kw):
    return lambda r: r.update(kw)


REFUSALS = [
    ("llava-tiny", top(foo=1), "config.json has unknown keys ['foo']"),
    ("llava-tiny", text(foo=1), "text_config has unknown keys ['foo']"),
    ("llava-tiny", vision(foo=1), "vision_config has unknown keys ['foo']"),
    (
        "llava-tiny",
        lambda r: r.pop("vision_feature_layer"),
        "missing the key 'vision_feature_layer'",
    ),
    ("llava-tiny", lambda r: r["text_config"].pop("head_dim"), "missing the key 'head_dim'"),
    ("llava-tiny", lambda r: r["vision_config"].pop("patch_size"), "missing the key 'patch_size'"),
    ("llava-tiny", top(model_type="llava_onevision"), "model_type 'llava_onevision'"),
    ("llava-tiny", text(model_type="qwen2"), "text_config.model_type is 'qwen2'"),
    ("llava-tiny", vision(model_type="siglip_vision_model"), "supports only 'clip_vision_model'"),
    ("llava-tiny", vision(hidden_act="relu"), "vision_config.hidden_act"),
    ("llava-tiny", text(hidden_act="gelu"), "supports only 'silu'"),
    ("llava-tiny", text(attention_bias=True), "attention_bias is True"),
    ("llava-tiny", text(mlp_bias=True), "mlp_bias is True"),
    (
        "llava-tiny",
        text(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        "rope type 'dynamic'",
    ),
    (
        "llava-tiny",
        text(
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
            }
        ),
        "partial_rotary_factor",
    ),
    (
        "llava-tiny",
        text(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}),
        "missing the key 'factor'",
    ),
    ("llava-tiny", text(num_key_value_heads=3), "do not divide into 3 KV heads"),
    ("llava-tiny", text(head_dim=15), "head_dim 15 is odd"),
    ("llava-tiny", top(vision_feature_layer=4), "vision_feature_layer 4 outside -4..3"),
    ("llava-tiny", top(vision_feature_layer=[]), "non-empty list"),
    ("llava-tiny", top(vision_feature_layer=True), "expected an integer"),
    (
        "llava-tiny",
        top(vision_feature_select_strategy="cls"),
        "vision_feature_select_strategy is 'cls'",
    ),
    ("llava-tiny", top(projector_hidden_act="relu6"), "projector_hidden_act is 'relu6'"),
    ("llava-tiny", top(multimodal_projector_bias="yes"), "expected true or false"),
    ("llava-tiny", top(image_token_index=416), "outside the 416 embeddings"),
    ("llava-tiny", top(vocab_size=500), "vocab_size 500 but text_config.vocab_size 416"),
    ("llava-tiny", vision(image_size=50), "not a multiple of patch_size"),
    ("llava-next-tiny", text(sliding_window=0), "sliding_window 0 must be at least 1"),
    (
        "llava-next-tiny",
        top(vision_feature_select_strategy="full"),
        "'full' cannot lay out anyres tiles",
    ),
    (
        "llava-next-tiny",
        top(image_grid_pinpoints=[[56, 100]]),
        "not all multiples of the 56-pixel tile",
    ),
    ("llava-next-tiny", top(image_grid_pinpoints=[[56]]), "pairs of positive integers"),
    (
        "llava-next-tiny",
        lambda r: r.pop("image_grid_pinpoints"),
        "missing the key 'image_grid_pinpoints'",
    ),
    (
        "llava-next-tiny",
        top(use_image_newline_parameter=False),
        "use_image_newline_parameter is False",
    ),
    (
        "llava-tiny",
        top(mm_vision_tower="openai/clip-vit-large-patch14-336"),
        "convert_llava_weights_to_hf.py",
    ),
    (
        "llava-tiny",
        top(architectures=["LlavaLlamaForCausalLM"]),
        "original LLaVA repository's format",
    ),
    (
        "llava-tiny",
        top(mm_projector_type="mlp2x_gelu", image_aspect_ratio="anyres"),
        "convert_llava_next_weights_to_hf.py",
    ),
]


@pytest.mark.parametrize("name, mutate, fragment", REFUSALS, ids=[f[2][:40] for f in REFUSALS])
def test_refusals_say_what_is_wrong(name, mutate, fragment):
    assert fragment in bad(name, mutate)


def test_generic_keys_are_accepted():
    raw = llava_preset("llava-next-tiny").to_hf_dict()
    for section in (raw, raw["text_config"], raw["vision_config"]):
        section.update(
            output_hidden_states=False, id2label={"0": "L"}, _name_or_path="x", dtype="bfloat16"
        )
    assert LlavaConfig.from_hf_dict(raw) == llava_preset("llava-next-tiny")


def test_transformers_4_style_rope_is_read():
    raw = llava_preset("llava-tiny").to_hf_dict()
    raw["text_config"].pop("rope_parameters")
    raw["text_config"].update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})
    rope = LlavaConfig.from_hf_dict(raw).text.rope
    assert (rope.kind, rope.factor, rope.theta) == ("linear", 4.0, 10000.0)


def test_config_file_errors(tmp_path):
    with pytest.raises(MllamaExportError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MllamaExportError, match="cannot read"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(MllamaExportError, match="expected a JSON object"):
        load_config(tmp_path)


def test_unknown_preset_lists_the_others():
    with pytest.raises(MllamaExportError, match="llava-tiny, llava-next-tiny, llava-1.5-7b"):
        llava_preset("llava-2")


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        llava_preset("llava-tiny").image_token_id = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 5e6},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 5e5,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_frequencies_match_transformers(rope):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from mllama_export.graphs.llava_text import text_inv_freq

    raw = llava_preset("llava-tiny").to_hf_dict()
    raw["text_config"]["rope_parameters"] = rope
    config = LlavaConfig.from_hf_dict(raw)
    hf_config = transformers.LlamaConfig(**{**raw["text_config"], "rope_parameters": dict(rope)})
    ref = LlamaRotaryEmbedding(hf_config).inv_freq
    torch.testing.assert_close(text_inv_freq(config.text), ref, rtol=1e-6, atol=0)
