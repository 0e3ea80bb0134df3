"""Config: presets with the published values, strict parsing of config.json."""

from __future__ import annotations

import copy
import json

import pytest

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import PRESETS, MllamaConfig, preset


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
