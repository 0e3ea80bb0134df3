"""meta vs hf cross-attention mask semantics."""

from __future__ import annotations

import torch
from conftest import random_images, torch_runner

from mllama_export.graphs.model import MllamaModel, PrefillGraph
from mllama_export.graphs.text import CrossAttentionDecoderLayer, cross_attention_masks

IMG = 512


def prefill_logits(model, prompt, images):
    return torch_runner(model).generate_ids([prompt], images, 1, keep_logits=True).prefill_logits[0]


def test_meta_rows_before_the_first_image_equal_the_text_only_path(tiny_model_meta):
    """Under meta semantics the cross-attention layers are the identity before the image."""
    before = [500, 20, 21, 22]
    images = random_images(tiny_model_meta.config, [[6]], seed=7)
    with_image = prefill_logits(tiny_model_meta, [*before, IMG, 23, 24], images)
    # A text token in the image's place and no images: the rows before it see the same tokens
    # (causal), and equal shapes keep equal float32 rounding, which a shorter prompt would not.
    text_only = prefill_logits(tiny_model_meta, [*before, 25, 23, 24], None)
    torch.testing.assert_close(
        with_image[: len(before)], text_only[: len(before)], rtol=0, atol=1e-6
    )
    shorter = prefill_logits(tiny_model_meta, before, None)
    torch.testing.assert_close(with_image[: len(before)], shorter, rtol=1e-4, atol=1e-5)
    # ...while another image changes every row from the image token on, and none before.
    other = random_images(tiny_model_meta.config, [[6]], seed=8)
    with_other = prefill_logits(tiny_model_meta, [*before, IMG, 23, 24], other)
    assert (with_other[: len(before)] == with_image[: len(before)]).all()
    assert (abs(with_other - with_image)[len(before) :].max(-1) > 1e-4).all()


def test_text_only_equals_a_decoder_without_cross_attention_layers(tiny_model_meta, tiny_model):
    """Zero image tokens make every cross-attention layer the identity, in both semantics."""
    prompt = [500, 30, 31, 32, 33]
    for model in (tiny_model_meta, tiny_model):
        ours = prefill_logits(model, prompt, None)
        text = model.text
        ids = torch.tensor([prompt])
        cos, sin = text.rotary(torch.arange(len(prompt))[None])
        allowed = torch.ones(len(prompt), len(prompt)).tril().bool()[None, None]
        x = text.embed_tokens(ids)
        with torch.no_grad():
            for layer in text.self_layers:
                x, _, _ = layer.prefill(x, cos, sin, allowed)
            expected = text.logits(x)[0]
        torch.testing.assert_close(torch.from_numpy(ours), expected, rtol=1e-5, atol=1e-5)


def test_semantics_agree_on_rows_that_see_an_image(tiny_dir):
    """Layer by layer: same input, same image K/V -> equal rows after the image; meta rows
    before it pass through unchanged while hf rows attend to the image."""
    from mllama_export.graphs.weights import load_model

    meta, hf = load_model(tiny_dir, "meta"), load_model(tiny_dir, "hf")
    c = meta.config.text
    torch.manual_seed(0)
    x = torch.randn(2, 6, c.hidden_size)
    n = meta.config.vision.num_patches * 4
    xk, xv = (
        torch.randn(2, c.num_kv_heads, n, c.head_dim),
        torch.randn(2, c.num_kv_heads, n, c.head_dim),
    )
    mask = torch.zeros(2, 6, 1, 4, dtype=torch.long)
    mask[0, 2:, 0, :3] = 1  # rows 0-1 see nothing
    mask[1, 4:, 0, :4] = 1
    allowed, row = cross_attention_masks(mask, meta.config.vision.num_patches)
    for layer_m, layer_h in zip(meta.text.cross_layers, hf.text.cross_layers, strict=True):
        assert isinstance(layer_m, CrossAttentionDecoderLayer)
        with torch.no_grad():
            out_m, out_h = layer_m(x, xk, xv, allowed, row), layer_h(x, xk, xv, allowed, row)
        sees = row[..., 0]
        torch.testing.assert_close(out_m[sees], out_h[sees], rtol=0, atol=0)
        torch.testing.assert_close(out_m[~sees], x[~sees], rtol=0, atol=0)
        assert (out_h[~sees] - x[~sees]).abs().max() > 1e-3


def test_semantics_recorded_on_the_model(tiny_model, tiny_model_meta):
    assert (tiny_model.semantics, tiny_model_meta.semantics) == ("hf", "meta")
    assert isinstance(tiny_model, MllamaModel) and PrefillGraph(tiny_model).plan
