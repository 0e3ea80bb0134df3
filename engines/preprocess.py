"""Llama 3.2 Vision image preprocessing in numpy + Pillow.

Reproduces transformers' ``MllamaImageProcessor`` (PIL backend) bit for bit, without importing
transformers or torch, so the engines run where neither is installed. One deliberate difference:
EXIF orientation is honoured (the reference ignores it and feeds sideways photos to the model).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mllama_export.errors import MllamaExportError
from mllama_export.graphs import strict

from .images import (
    _CHANNELS,
    _MEAN,
    _POSITIVE,
    _POSITIVE_INT,
    _STD,
    _WHERE,
    ImageSource,
    _describe,
    _resample_check,
    _value_table,
    load_image,
)

REQUIRED_KEYS = (
    "do_convert_rgb",
    "do_resize",
    "size",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_pad",
    "max_image_tiles",
)

# Keys real preprocessor_config.json files carry that do not change the pixels.
HARMLESS_KEYS = {
    "image_processor_type": "names the transformers class to build; checked to be an Mllama one",
    "processor_class": "names the multimodal processor wrapping this one and the tokenizer",
    "_processor_class": "older transformers' spelling of processor_class",
    "feature_extractor_type": "legacy class selector written before image processors existed",
}


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (tiles_high, tiles_wide) grids with at most ``max_image_tiles`` tiles, in reference order.

    The reference's docstring calls the pairs (width, height) but its code uses the first number as
    the height everywhere; aspect ratio ids are indices into this order, so only the order matters.
    """
    return tuple(
        (a, b)
        for a in range(1, max_image_tiles + 1)
        for b in range(1, max_image_tiles + 1)
        if a * b <= max_image_tiles
    )


@lru_cache(maxsize=1024)
def optimal_tiled_canvas(
    height: int, width: int, max_image_tiles: int, tile_size: int
) -> tuple[int, int]:
    """The (height, width) canvas the reference picks: least upscaling, else least downscaling."""
    canvases = [(a * tile_size, b * tile_size) for a, b in supported_aspect_ratios(max_image_tiles)]
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    # Ties go to the smallest area, the first such canvas in list order (np.argmin).
    candidates = [c for c, s in zip(canvases, scales, strict=True) if s == chosen]
    return min(candidates, key=lambda c: c[0] * c[1])


def fit_to_canvas(
    height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int
) -> tuple[int, int]:
    """The (height, width) the reference resizes to: aspect-preserving, floor-rounded, at least 1."""
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_h = target_h / height
    scale_w = target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessing settings of a checkpoint's ``preprocessor_config.json``."""

    do_convert_rgb: bool
    do_resize: bool
    size: dict[str, int] = field(hash=False)
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_pad: bool
    max_image_tiles: int

    @property
    def tile_size(self) -> int:
        return self.size["height"]

    @property
    def supported_aspect_ratios(self) -> tuple[tuple[int, int], ...]:
        return supported_aspect_ratios(self.max_image_tiles)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ImageProcessorConfig:
        """Validate a ``preprocessor_config.json`` dict; unknown or missing keys are errors."""
        raw = dict(config) if isinstance(config, Mapping) else config
        values = strict.read(_WHERE, raw, _KEYS, note=_HARMLESS_NOTE, prefix=f"{_WHERE}: ")
        return cls(**strict.fields(_KEYS, values))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ImageProcessorConfig:
        """Read and validate a ``preprocessor_config.json`` file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise MllamaExportError(
                f"cannot read preprocessor config '{path}': {exc.strerror or exc} "
                "(expected a readable preprocessor_config.json)"
            ) from exc
        try:
            config = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MllamaExportError(
                f"preprocessor config '{path}' is not valid JSON: {exc} (expected a JSON object)"
            ) from exc
        return cls.from_dict(config)


def _processor_type(kind: Any) -> str:
    if not (isinstance(kind, str) and kind.startswith("MllamaImageProcessor")):
        raise strict.Wrong("'MllamaImageProcessor'")
    return kind


def _true(value: Any) -> bool:
    # The reference refuses do_resize/do_pad = false: tiles need a fixed-size padded canvas.
    if strict.boolean(value) is not True:
        raise strict.Wrong("true; MllamaImageProcessor supports no other mode")
    return True


def _tile_size(size: Any) -> dict[str, int]:
    expected = 'a square {"height": N, "width": N} with N a positive integer'
    if not isinstance(size, Mapping) or set(size) != {"height", "width"}:
        raise strict.Wrong(expected)
    height, width = size["height"], size["width"]
    if height != width or isinstance(height, bool) or not isinstance(height, int) or height <= 0:
        raise strict.Wrong(expected)
    return {"height": height, "width": height}


_CHECKS: dict[str, strict.Check] = {
    "do_convert_rgb": strict.boolean,
    "do_resize": _true,
    "size": _tile_size,
    "resample": _resample_check,
    "do_rescale": strict.boolean,
    "rescale_factor": _POSITIVE,
    "do_normalize": strict.boolean,
    "image_mean": _MEAN,
    "image_std": _STD,
    "do_pad": _true,
    "max_image_tiles": _POSITIVE_INT,
}
_KEYS = (
    strict.Key("image_processor_type", _processor_type, default=None),
    *(strict.Key(key, _CHECKS[key], attr=key) for key in REQUIRED_KEYS),
    *(
        strict.Key(key, strict.anything, default=None)
        for key in HARMLESS_KEYS
        if key != "image_processor_type"
    ),
)
_HARMLESS_NOTE = f" ({', '.join(HARMLESS_KEYS)} are the harmless optional ones)"


@dataclass
class PreprocessedImages:
    """Model inputs for a batch: rows of images, padded to the longest row and to max tiles."""

    pixel_values: np.ndarray  # float32 [batch, max_num_images, max_image_tiles, 3, H, W]
    aspect_ratio_ids: np.ndarray  # int64 [batch, max_num_images]; 1-based, 0 for padding images
    aspect_ratio_mask: np.ndarray  # int64 [batch, max_num_images, max_image_tiles]
    num_tiles: list[list[int]]


def preprocess(
    images: Sequence[Sequence[ImageSource]], config: ImageProcessorConfig
) -> PreprocessedImages:
    """Turn rows of images (paths, bytes or PIL images) into Llama 3.2 Vision model inputs."""
    rows = _image_rows(images)
    tiled = [[_tile(_prepare(source, config), config) for source in row] for row in rows]
    return _pack(tiled, config)


def _image_rows(images: Any) -> list[list[ImageSource]]:
    if not isinstance(images, list | tuple) or not all(isinstance(r, list | tuple) for r in images):
        raise MllamaExportError(
            f"images is {type(images).__name__} {images!r:.80} (expected a list of rows, each a "
            "list of images)"
        )
    if not any(images):
        raise MllamaExportError(
            f"no images to preprocess: {len(images)} row(s), all empty (expected at least one)"
        )
    return [list(row) for row in images]


def _prepare(source: ImageSource, config: ImageProcessorConfig) -> Image.Image:
    image = load_image(source, convert_rgb=config.do_convert_rgb)
    if image.mode != "RGB":
        # Without conversion the reference only works on RGB; other modes crash in normalize.
        raise MllamaExportError(
            f"image {_describe(source)} has mode {image.mode!r} and the config says "
            "do_convert_rgb=false (expected an RGB image, or do_convert_rgb=true)"
        )
    return image


def _tile(image: Image.Image, config: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize onto the best canvas, zero-pad it, and cut it into uint8 [tiles, 3, t, t]."""
    tile = config.tile_size
    canvas_h, canvas_w = optimal_tiled_canvas(
        image.height, image.width, config.max_image_tiles, tile
    )
    new_h, new_w = fit_to_canvas(image.height, image.width, canvas_h, canvas_w, tile)
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = np.asarray(image.resize((new_w, new_h), resample=config.resample))
    rows, cols = canvas_h // tile, canvas_w // tile
    tiles = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 4, 1, 3)
    return tiles.reshape(rows * cols, 3, tile, tile), (rows, cols)


def _pack(
    tiled: list[list[tuple[np.ndarray, tuple[int, int]]]], config: ImageProcessorConfig
) -> PreprocessedImages:
    batch, max_images = len(tiled), max(len(row) for row in tiled)
    max_tiles, tile = config.max_image_tiles, config.tile_size
    pixel_values = np.zeros((batch, max_images, max_tiles, 3, tile, tile), dtype=np.float32)
    ids = np.zeros((batch, max_images), dtype=np.int64)
    mask = np.zeros((batch, max_images, max_tiles), dtype=np.int64)
    # The reference marks tile 0 valid even for padding images (its original code padded with 1x1).
    mask[:, :, 0] = 1
    table = _value_table(config)
    for b, row in enumerate(tiled):
        for i, (tiles, grid) in enumerate(row):
            pixel_values[b, i, : len(tiles)] = table[_CHANNELS, tiles]
            ids[b, i] = config.supported_aspect_ratios.index(grid) + 1
            mask[b, i, : len(tiles)] = 1
    num_tiles = [[len(tiles) for tiles, _ in row] for row in tiled]
    return PreprocessedImages(pixel_values, ids, mask, num_tiles)
