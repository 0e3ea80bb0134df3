"""Where each image token's feature comes from: LLaVA-NeXT's anyres geometry and the prefill's
`image_layout` input, in plain Python and numpy (no torch) for the engines and the exporter.

The geometry reproduces transformers' `select_best_resolution`, `get_anyres_image_grid_shape`,
`unpad_image` and `pack_image_features` (the model side) and
`LlavaNextProcessor._get_number_of_features` (the prompt side), which agree with each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mllama_export.errors import MllamaExportError

from .llava_config import LlavaConfig
from .llava_contract import NEWLINE_TOKEN, TEXT_TOKEN

ImageSize = tuple[int, int]  # (height, width) of the original image, as image_sizes holds it


def select_best_resolution(height: int, width: int, pinpoints: Sequence[ImageSize]) -> ImageSize:
    """The (height, width) pinpoint that keeps the most of the image's pixels, then wastes least."""
    best, most_kept, least_wasted = pinpoints[0], 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (ph, pw), kept, wasted
    return best


def anyres_grid(config: LlavaConfig, size: ImageSize) -> tuple[int, int]:
    """(rows, cols) of tiles the image is cut into, besides its downscaled whole view."""
    ph, pw = select_best_resolution(*size, config.image_grid_pinpoints)
    tile = config.vision.image_size
    return -(-ph // tile), -(-pw // tile)


def unpadded_region(size: ImageSize, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a height x width patch map that shows the image rather than
    the padding it was centred in: transformers' `unpad_image`, rounding included."""
    orig_h, orig_w = size
    if orig_w / orig_h > width / height:
        new_h = int(round(orig_h * (width / orig_w), 7))
        pad = (height - new_h) // 2
        return pad, height - pad, 0, width
    new_w = int(round(orig_w * (height / orig_h), 7))
    pad = (width - new_w) // 2
    return 0, height, pad, width - pad


def image_tiles(config: LlavaConfig, size: ImageSize) -> int:
    """Tiles one image takes in the vision graph's input."""
    if not config.is_next:
        return 1
    rows, cols = anyres_grid(config, size)
    return 1 + rows * cols


def image_feature_indices(config: LlavaConfig, size: ImageSize, first_tile: int = 0) -> np.ndarray:
    """The layout values of one image's tokens, in prompt order: indices into the flattened
    features of tiles first_tile, first_tile + 1, ... and NEWLINE_TOKEN where a row ends.

    LLaVA 1.5: the tile's features. LLaVA-NeXT: the whole view's features, then the grid
    tiles' patches as one spatial map, unpadded to the image's aspect ratio, row by row, each
    row closed by the newline vector.
    """
    per_tile = config.tile_tokens
    base = first_tile * per_tile + np.arange(per_tile, dtype=np.int64)
    if not config.is_next:
        return base
    g = config.vision.grid
    rows, cols = anyres_grid(config, size)
    top, bottom, left, right = unpadded_region(size, rows * g, cols * g)
    y = np.arange(top, bottom, dtype=np.int64)[:, None]
    x = np.arange(left, right, dtype=np.int64)[None, :]
    tile = first_tile + 1 + (y // g) * cols + x // g
    grid = tile * per_tile + (y % g) * g + x % g
    newline = np.full((len(grid), 1), NEWLINE_TOKEN, dtype=np.int64)
    return np.concatenate((base, np.concatenate((grid, newline), axis=1).ravel()))


def image_token_count(config: LlavaConfig, size: ImageSize) -> int:
    """Image tokens one image expands to in the prompt."""
    if not config.is_next:
        return config.tile_tokens
    g = config.vision.grid
    rows, cols = anyres_grid(config, size)
    top, bottom, left, right = unpadded_region(size, rows * g, cols * g)
    return config.tile_tokens + (bottom - top) * (right - left + 1)


def _check_sizes(images: Sequence[Sequence[ImageSize]], batch: int) -> None:
    if len(images) != batch:
        raise MllamaExportError(
            f"got {len(images)} rows of images for {batch} token rows; expected one list of "
            "image sizes per row (empty for a text-only row)"
        )
    for b, row in enumerate(images):
        for size in row:
            ok = len(size) == 2 and all(isinstance(v, int | np.integer) and v > 0 for v in size)
            if not ok:
                raise MllamaExportError(
                    f"row {b} has image size {size!r}; expected (height, width) in pixels"
                )


def check_image_tokens(
    input_ids: Sequence[Sequence[int]] | np.ndarray,
    images: Sequence[Sequence[ImageSize]],
    config: LlavaConfig,
) -> None:
    """Token ids as the processor makes them: each image's tokens expanded, where it is.

    Refuses, in one line, a row whose image tokens do not add up to its images' counts, or
    whose runs of image tokens split an image (ids expanded for other image sizes).
    """
    rows = [np.asarray(r) for r in input_ids]  # ragged rows are fine: nothing is padded yet
    _check_sizes(images, len(rows))
    for b, row in enumerate(images):
        counts = [image_token_count(config, tuple(int(v) for v in s)) for s in row]
        is_image = np.concatenate(([False], rows[b] == config.image_token_id, [False]))
        edges = np.flatnonzero(np.diff(is_image.astype(np.int8)))
        runs = (edges[1::2] - edges[::2]).tolist()
        bounds = set(np.cumsum(counts).tolist())
        ends = np.cumsum(runs).tolist()
        if sum(runs) != sum(counts) or not set(ends) <= bounds:
            raise MllamaExportError(
                f"row {b} has {sum(runs)} image tokens (runs of {runs}) but its {len(counts)} "
                f"images need {sum(counts)} ({counts}, one run each, in order); expected ids "
                "expanded by the processor for these images"
            )


def build_image_layout(
    input_ids: np.ndarray, images: Sequence[Sequence[ImageSize]], config: LlavaConfig
) -> np.ndarray:
    """The prefill's int64 [batch, sequence] `image_layout` for left-padded, expanded ids.

    `images[b]` lists the (height, width) of row b's images in prompt order; their tiles are
    numbered across the batch in that order, as the vision graph's input holds them.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise MllamaExportError(
            f"input_ids has shape {list(ids.shape)}; expected [batch, sequence]"
        )
    check_image_tokens(ids, images, config)
    layout = np.full(ids.shape, TEXT_TOKEN, dtype=np.int64)
    tile = 0
    for b, row in enumerate(images):
        parts = []
        for size in row:
            size = (int(size[0]), int(size[1]))
            parts.append(image_feature_indices(config, size, first_tile=tile))
            tile += image_tiles(config, size)
        if parts:
            layout[b, ids[b] == config.image_token_id] = np.concatenate(parts)
    return layout


def decode_attention_mask(filled: np.ndarray, new_slot: int, window: int | None) -> np.ndarray:
    """The decode step's `attention_mask`: the filled cache slots [batch, slots] the token
    written to `new_slot` may see; with a sliding window only slots > new_slot - window."""
    mask = np.asarray(filled, dtype=np.int64)
    if window is None:
        return mask
    return mask * (np.arange(mask.shape[1]) > new_slot - window)
