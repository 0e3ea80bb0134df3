"""graphs.llava_layout against transformers' anyres geometry and pack_image_features."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.llava_contract import NEWLINE_TOKEN, TEXT_TOKEN
from mllama_export.graphs.llava_layout import (
    build_image_layout,
    check_image_tokens,
    decode_attention_mask,
    image_feature_indices,
    image_tiles,
    image_token_count,
    select_best_resolution,
    unpadded_region,
)
from mllama_export.graphs.llava_presets import llava_preset

transformers = pytest.importorskip("transformers")
from transformers.image_processing_utils import select_best_resolution as hf_best  # noqa: E402
from transformers.models.llava_next import modeling_llava_next as hf_next  # noqa: E402

PINPOINT_SETS = [
    [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    [[56, 28], [28, 56], [56, 56], [28, 28], [28, 112]],
    [[384, 384], [384, 768], [768, 384], [1152, 384], [384, 1152], [768, 768]],
]
LENGTHS = [1, 2, 13, 27, 28, 29, 55, 56, 57, 100, 335, 336, 337, 671, 673, 1000, 1009, 3000]


def test_best_resolution_matches_transformers():
    for pinpoints in PINPOINT_SETS:
        for h in LENGTHS:
            for w in LENGTHS:
                assert select_best_resolution(h, w, pinpoints) == tuple(hf_best((h, w), pinpoints))


def test_unpadding_matches_transformers():
    rng = np.random.default_rng(0)
    for _ in range(300):
        orig = tuple(int(v) for v in rng.integers(1, 2000, 2))
        height, width = (int(v) for v in rng.integers(1, 90, 2))
        top, bottom, left, right = unpadded_region(orig, height, width)
        ref = hf_next.unpad_image(torch.zeros(1, height, width), orig)
        assert ref.shape[1:] == (bottom - top, right - left), (orig, height, width)


def next_config(pinpoints, tile=28, patch=14):
    base = llava_preset("llava-next-tiny")
    vision = replace(base.vision, image_size=tile, patch_size=patch)
    return replace(base, vision=vision, image_grid_pinpoints=tuple(tuple(p) for p in pinpoints))


def packed_by_transformers(config, sizes):
    """pack_image_features on features that hold their own flat index, and -2 as the newline."""
    v = config.vision
    fake = SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=v.image_size, patch_size=v.patch_size),
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        )
    )
    per_tile, start, features = config.tile_tokens, 0, []
    for size in sizes:
        n = image_tiles(config, size)
        index = torch.arange(start * per_tile, (start + n) * per_tile, dtype=torch.float64)
        features.append(index.view(n, per_tile, 1))
        start += n
    packed, _ = hf_next.LlavaNextModel.pack_image_features(
        fake,
        features,
        torch.tensor(sizes),
        "default",
        image_newline=torch.tensor([-2.0], dtype=torch.float64),
    )
    return [p[:, 0].long().numpy() for p in packed]


@pytest.mark.parametrize(
    "pinpoints, tile, patch",
    [(PINPOINT_SETS[1], 28, 14), (PINPOINT_SETS[0], 336, 14), (PINPOINT_SETS[2], 384, 32)],
)
def test_layout_is_what_pack_image_features_gathers(pinpoints, tile, patch):
    config = next_config(pinpoints, tile, patch)
    rng = np.random.default_rng(tile)
    sizes = [tuple(int(v) for v in np.exp(rng.uniform(0, np.log(3000), 2))) for _ in range(40)]
    sizes += [(1, 1), (1, 3000), (3000, 1), (tile, tile), (2 * tile, tile)]
    expected = packed_by_transformers(config, sizes)
    first = 0
    for size, ref in zip(sizes, expected, strict=True):
        ours = image_feature_indices(config, size, first_tile=first)
        np.testing.assert_array_equal(ours, ref, err_msg=str(size))
        assert image_token_count(config, size) == len(ours)
        first += image_tiles(config, size)


def test_llava_15_image_is_one_tile_of_features():
    config = llava_preset("llava-tiny")
    np.testing.assert_array_equal(
        image_feature_indices(config, (5, 900), first_tile=3), np.arange(48, 64)
    )
    assert image_tiles(config, (5, 900)) == 1 and image_token_count(config, (1, 1)) == 16


def test_batch_layout_numbers_tiles_across_rows():
    config = llava_preset("llava-next-tiny")
    sizes = [[(30, 70)], [], [(90, 33), (56, 56)]]
    img = config.image_token_id
    counts = [[image_token_count(config, s) for s in row] for row in sizes]
    rows = [[5] + [img] * counts[0][0] + [6], [7, 8], [9] + [img] * sum(counts[2]) + [10]]
    width = max(len(r) for r in rows)
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    layout = build_image_layout(ids, sizes, config)
    assert (layout[ids != img] == TEXT_TOKEN).all()
    t0 = image_tiles(config, (30, 70))
    np.testing.assert_array_equal(layout[0][ids[0] == img], image_feature_indices(config, (30, 70)))
    second = np.concatenate(
        [
            image_feature_indices(config, (90, 33), t0),
            image_feature_indices(config, (56, 56), t0 + image_tiles(config, (90, 33))),
        ]
    )
    np.testing.assert_array_equal(layout[2][ids[2] == img], second)
    assert (layout == NEWLINE_TOKEN).sum() > 0


@pytest.mark.parametrize(
    "rows, sizes, fragment",
    [
        (
            [[1, 2]],
            [[(20, 20)]],
            r"row 0 has 0 image tokens \(runs of \[\]\) but its 1 images need 16",
        ),
        ([[1] + [403] * 15], [[(20, 20)]], "has 15 image tokens"),
        ([[1] + [403] * 8 + [2] + [403] * 8], [[(20, 20)]], r"runs of \[8, 8\]"),
        ([[1] + [403] * 8 + [2] + [403] * 24], [[(20, 20)] * 2], r"runs of \[8, 24\]"),
        ([[1, 2]], [[], []], "2 rows of images for 1 token rows"),
        ([[1, 2]], [[(0, 5)]], r"image size \(0, 5\)"),
    ],
    ids=["no-tokens", "too-few", "split-image", "split-across", "rows", "bad-size"],
)
def test_token_ids_must_match_the_images(rows, sizes, fragment):
    with pytest.raises(MllamaExportError, match=fragment):
        check_image_tokens(rows, sizes, llava_preset("llava-tiny"))


def test_adjacent_images_may_share_a_run():
    config = llava_preset("llava-tiny")
    check_image_tokens([[1] + [403] * 32 + [2]], [[(9, 9), (9, 9)]], config)


def test_decode_mask_keeps_the_window():
    filled = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    np.testing.assert_array_equal(decode_attention_mask(filled, 8, None), filled)
    # the token in slot 8 sees slots 5..8 with a window of 4: 5, 6, 7 from the cache
    np.testing.assert_array_equal(
        decode_attention_mask(filled, 8, 4), [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]
    )
