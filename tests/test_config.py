"""Config: presets with the published values, strict parsing of config.json."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import PRESETS, MllamaConfig, preset, truncated
from mllama_export.graphs.model import MllamaModel


def test_11b_preset_has_the_published_values():
    c = preset("11b")
    t, v = c.text, c.vision
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads) == (4096, 40, 32, 8)
    assert (t.intermediate_size, t.vocab_size, t.embedding_rows) == (14336, 128256, 128264)
    assert t.cross_attention_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert t.rms_norm_eps == 1e-5 and c.image_token_id == 128256
    assert (t.rope.theta, t.rope.kind, t.rope.factor) == (500000.0, "llama3", 8.0)
    assert (t.rope.low_freq_factor, t.rope.high_freq_factor) == (1.0, 4.0)
    assert t.rope.original_max_position_embeddings == 8192
    assert (v.hidden_size, v.num_layers, v.num_global_layers, v.num_heads) == (1280, 32, 8, 16)
    assert (v.intermediate_size, v.image_size, v.patch_size, v.max_num_tiles) == (5120, 560, 14, 4)
    assert v.intermediate_layers == (3, 7, 15, 23, 30) and v.output_dim == 7680
    assert v.supported_aspect_ratios == (
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 4),
        (2, 1),
        (2, 2),
        (3, 1),
        (4, 1),
    )
    assert (v.num_patches, v.padded_patches) == (1601, 1608)


def test_90b_preset_has_the_published_values():
    c = preset("90b")
    t = c.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads) == (8192, 100, 64, 8)
    assert t.intermediate_size == 28672
    assert t.cross_attention_layers == tuple(range(3, 99, 5)) and t.cross_attention_layers[-1] == 98
    assert c.vision == preset("11b").vision


def test_presets_round_trip_through_transformers():
    transformers = pytest.importorskip("transformers")
    for name in PRESETS:
        hf = transformers.MllamaConfig(**copy.deepcopy(PRESETS[name]))
        assert MllamaConfig.from_hf_dict(hf.to_dict()) == preset(name)


def test_published_style_config_with_generic_keys_is_accepted():
    raw = copy.deepcopy(PRESETS["11b"])
    for section in (raw["text_config"], raw["vision_config"]):
        section.update(torchscript=False, output_hidden_states=False, id2label={"0": "L"}, top_k=50)
    raw["transformers_version"] = "4.45.0.dev0"
    assert MllamaConfig.from_hf_dict(raw) == preset("11b")


def bad(mutate):
    raw = copy.deepcopy(PRESETS["tiny"])
    mutate(raw)
    with pytest.raises(MllamaExportError) as err:
        MllamaConfig.from_hf_dict(raw)
    return str(err.value)


def test_unknown_keys_are_named():
    msg = bad(lambda r: r["text_config"].update(sliding_window=4096))
    assert "text_config" in msg and "sliding_window" in msg


def test_missing_keys_are_named():
    msg = bad(lambda r: r["vision_config"].pop("patch_size"))
    assert "vision_config" in msg and "'patch_size'" in msg


def test_other_architectures_are_refused():
    msg = bad(lambda r: r.update(model_type="llava"))
    assert "llava" in msg and "mllama" in msg


def test_inconsistent_sizes_are_refused():
    assert "vision_output_dim" in bad(lambda r: r["vision_config"].update(vision_output_dim=100))
    assert "cross_attention_layers" in bad(
        lambda r: r["text_config"].update(cross_attention_layers=[9])
    )
    assert "silu" in bad(lambda r: r["text_config"].update(hidden_act="gelu"))
    assert "rope type" in bad(lambda r: r["text_config"]["rope_scaling"].update(rope_type="yarn"))


def test_config_file_errors(tmp_path):
    with pytest.raises(MllamaExportError, match="no config.json"):
        MllamaConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MllamaExportError, match="cannot read"):
        MllamaConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"]))
    assert MllamaConfig.from_hf_config(tmp_path) == preset("tiny")


def test_unknown_preset():
    with pytest.raises(MllamaExportError, match="tiny, 11b, 90b"):
        preset("7b")


def test_truncated_keeps_the_geometry():
    full = preset("11b")
    short = truncated(full, text_layers=8, vision_layers=4, global_layers=2)
    t, v = short.text, short.vision
    assert (t.num_layers, t.cross_attention_layers) == (8, (3,))
    assert (v.num_layers, v.num_global_layers) == (4, 2)
    # Taps keep their count, so the projector keeps its input width.
    assert v.intermediate_layers == (3, 3, 3, 3, 3) and v.output_dim == full.vision.output_dim
    assert (
        dataclasses.replace(
            t, num_layers=40, cross_attention_layers=full.text.cross_attention_layers
        )
        == full.text
    )
    assert (
        dataclasses.replace(
            v,
            num_layers=32,
            num_global_layers=8,
            intermediate_layers=full.vision.intermediate_layers,
        )
        == full.vision
    )
    assert short.image_token_id == full.image_token_id
    assert MllamaConfig.from_hf_dict(short.to_hf_dict()) == short


def test_truncated_round_trips_through_transformers():
    transformers = pytest.importorskip("transformers")
    short = truncated(preset("tiny"), 3, 2, 1)
    hf = transformers.MllamaConfig(**short.to_hf_dict())
    assert MllamaConfig.from_hf_dict(hf.to_dict()) == short


def test_truncated_cross_layers():
    tiny = preset("tiny")  # cross-attention layers 1 and 4 of 6
    assert truncated(tiny, 6, 4, 2) == tiny
    assert truncated(tiny, 4, 4, 2).text.cross_attention_layers == (1,)
    assert truncated(tiny, 5, 4, 2).text.cross_attention_layers == (1, 4)
    assert truncated(tiny, 3, 1, 1, cross_layers=(2, 0)).text.cross_attention_layers == (0, 2)
    assert truncated(preset("11b"), 2, 2, 1, cross_layers=(1,)).text.self_attention_layers == (0,)


@pytest.mark.parametrize(
    "layers, cross, fragment",
    [
        ((0, 4, 2), None, "text_layers 0"),
        ((7, 4, 2), None, "original 6"),
        ((6, 0, 2), None, "vision_layers 0"),
        ((6, 5, 2), None, "original 4"),
        ((6, 4, 3), None, "global_layers 3"),
        ((1, 4, 2), None, "no cross-attention layer"),
        ((3, 4, 2), (3,), "within 0..2"),
        ((3, 4, 2), (), "one or more"),
        ((3, 4, 2), (1, 1), "distinct"),
        ((2, 4, 2), (0, 1), "none of the 2 text layers for self-attention"),
    ],
)
def test_truncated_errors_say_what_is_allowed(layers, cross, fragment):
    with pytest.raises(MllamaExportError, match=fragment):
        truncated(preset("tiny"), *layers, cross_layers=cross)


@pytest.mark.parametrize(
    "name, layers",
    [("tiny", (3, 2, 1)), ("tiny", (2, 1, 1)), ("11b", (8, 6, 2)), ("11b", (4, 1, 1))],
)
def test_truncated_weights_are_a_subset_of_the_full_ones(name, layers):
    # Meta tensors only: the 11B model is never materialized.
    with torch.device("meta"):
        full = {n: p.shape for n, p in MllamaModel(preset(name)).state_dict().items()}
        short = MllamaModel(truncated(preset(name), *layers)).state_dict()
    assert short.keys() < full.keys()
    assert all(p.shape == full[n] for n, p in short.items())


def test_truncated_vision_keeps_its_output_width():
    # Taps (1, 3) become (1, 1): the repeated tap must be returned twice, as transformers does.
    config = truncated(preset("tiny"), 3, 2, 1)
    v = config.vision
    torch.manual_seed(0)
    model = MllamaModel(config)
    pixels = torch.randn(1, v.max_num_tiles, v.num_channels, v.image_size, v.image_size)
    features = model.vision(pixels, torch.tensor([1]), torch.tensor([[1, 0, 0, 0]]))
    assert features.shape[-1] == v.output_dim


@pytest.mark.parametrize(
    "section, key",
    [
        ("text_config", "num_attention_heads"),
        ("text_config", "num_key_value_heads"),
        ("text_config", "hidden_size"),
        ("vision_config", "attention_heads"),
        ("vision_config", "patch_size"),
    ],
)
def test_a_zero_size_or_head_count_is_refused_with_a_message(section, key):
    # these divide other sizes; 0 raised ZeroDivisionError from the checks that follow
    raw = copy.deepcopy(PRESETS["tiny"])
    raw[section][key] = 0
    with pytest.raises(MllamaExportError, match=rf"{section}\.{key} is 0; expected a positive"):
        MllamaConfig.from_hf_dict(raw)
