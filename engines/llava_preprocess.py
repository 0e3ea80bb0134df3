"""LLaVA image preprocessing in numpy + Pillow, and the checkpoint's processor settings.

Reproduces transformers' `CLIPImageProcessor` (LLaVA 1.5) and `LlavaNextImageProcessor` (PIL
backend) without importing transformers or torch. As for Mllama (engines/preprocess.py), EXIF
orientation is honoured where the reference feeds sideways photos to the model.

The settings are read strictly from either layout a checkpoint may have: transformers 5.x
nests the image processor's settings in `processor_config.json`; the published llava-hf
checkpoints keep them in `preprocessor_config.json` beside it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_layout import select_best_resolution

from .images import (
    ImageSource,
    _bool,
    _config_error,
    _positive_float,
    _positive_int,
    _resample,
    _triple,
    _value_table,
    load_image,
)

IMAGE_KEYS = (
    "do_convert_rgb",
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)
NEXT_KEYS = ("image_grid_pinpoints",)
# Keys that real preprocessor configs carry and that do not change the pixels.
HARMLESS_KEYS = {
    "image_processor_type": "names the transformers class; checked to be CLIP's or LLaVA-NeXT's",
    "processor_class": "names the multimodal processor wrapping this one and the tokenizer",
    "_processor_class": "older transformers' spelling of processor_class",
    "feature_extractor_type": "legacy class selector written before image processors existed",
    "aspect_ratio_setting": "the llava-hf NeXT conversion's note that it is 'anyres'",
}
IMAGE_PROCESSORS = {"CLIPImageProcessor": "llava", "LlavaNextImageProcessor": "llava_next"}
PROCESSOR_KEYS = (
    "patch_size",
    "vision_feature_select_strategy",
    "num_additional_image_tokens",
    "image_token",
)
PROCESSORS = {"LlavaProcessor": "llava", "LlavaNextProcessor": "llava_next"}


@dataclass(frozen=True)
class LlavaImageConfig:
    """An image processor's settings: CLIPImageProcessor's, plus the pinpoints for NeXT."""

    kind: str  # "llava" (CLIPImageProcessor) or "llava_next" (LlavaNextImageProcessor)
    do_convert_rgb: bool
    do_resize: bool
    size: tuple[tuple[str, int], ...]  # ("shortest_edge", n) or ("height", h), ("width", w)
    resample: int
    do_center_crop: bool
    crop_size: tuple[int, int]  # (height, width)
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_pad: bool = True  # NeXT: pad every image's tile count to the batch's longest
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()

    @property
    def tile(self) -> tuple[int, int] | None:
        """(height, width) of every tile the processor outputs; None when it varies by image
        (a shortest-edge resize without a crop)."""
        if self.do_center_crop:
            return self.crop_size
        return _square(self.size) if "height" in dict(self.size) else None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LlavaImageConfig:
        if not isinstance(raw, Mapping):
            raise MllamaExportError(
                f"preprocessor config is a {type(raw).__name__} (expected a JSON object)"
            )
        kind = _image_processor_kind(raw)
        required = IMAGE_KEYS + (NEXT_KEYS if kind == "llava_next" else ())
        allowed = {*required, *HARMLESS_KEYS, *(("do_pad",) if kind == "llava_next" else ())}
        _check_keys("preprocessor config", raw, required, allowed)
        return cls(
            kind=kind,
            do_convert_rgb=_bool(raw, "do_convert_rgb"),
            do_resize=_bool(raw, "do_resize"),
            size=_size(raw["size"]),
            resample=_resample(raw["resample"]),
            do_center_crop=_bool(raw, "do_center_crop"),
            crop_size=_crop_size(raw["crop_size"]),
            do_rescale=_bool(raw, "do_rescale"),
            rescale_factor=_positive_float(raw, "rescale_factor"),
            do_normalize=_bool(raw, "do_normalize"),
            image_mean=_triple(raw, "image_mean", allow_zero=True),
            image_std=_triple(raw, "image_std", allow_zero=False),
            do_pad=_bool(raw, "do_pad") if "do_pad" in raw else True,
            image_grid_pinpoints=_pinpoints(raw) if kind == "llava_next" else (),
        )


@dataclass(frozen=True)
class LlavaProcessorConfig:
    """What LlavaProcessor / LlavaNextProcessor read: the image settings and how many image
    tokens each image expands to."""

    image: LlavaImageConfig
    patch_size: int
    vision_feature_select_strategy: str
    num_additional_image_tokens: int  # CLIP's class token: 1
    image_token: str

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None
    ) -> LlavaProcessorConfig:
        """processor_config.json, with the image settings nested (transformers 5.x) or given
        separately (the published preprocessor_config.json)."""
        if not isinstance(raw, Mapping):
            raise MllamaExportError(
                f"processor config is a {type(raw).__name__} (expected a JSON object)"
            )
        nested = "image_processor" in raw
        if nested == (preprocessor is not None):
            raise MllamaExportError(
                "expected the image processor's settings either nested in processor_config.json "
                "('image_processor', transformers 5.x) or in preprocessor_config.json, "
                + ("found both" if nested else "found neither")
            )
        allowed = {*PROCESSOR_KEYS, "processor_class", "image_processor"}
        _check_keys("processor config", raw, PROCESSOR_KEYS, allowed)
        kind = raw.get("processor_class")
        if kind is not None and kind not in PROCESSORS:
            raise _config_error("processor_class", kind, f"one of {list(PROCESSORS)}")
        strategy = raw["vision_feature_select_strategy"]
        if strategy not in ("default", "full"):
            raise _config_error("vision_feature_select_strategy", strategy, "'default' or 'full'")
        if not isinstance(raw["image_token"], str) or not raw["image_token"]:
            raise _config_error("image_token", raw["image_token"], "a non-empty string")
        extra = raw["num_additional_image_tokens"]
        if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
            raise _config_error("num_additional_image_tokens", extra, "0 or a positive integer")
        image = LlavaImageConfig.from_dict(raw["image_processor"] if nested else preprocessor)
        if kind is not None and PROCESSORS[kind] != image.kind:
            expected = [k for k, v in PROCESSORS.items() if v == image.kind]
            raise MllamaExportError(
                f"processor_class {kind} does not go with the image processor for {image.kind}; "
                f"expected {' or '.join(expected)} (processor_config.json and "
                "preprocessor_config.json come from one checkpoint)"
            )
        return cls(image, _positive_int(raw, "patch_size"), strategy, extra, raw["image_token"])

    @classmethod
    def from_dir(cls, folder: str | Path) -> LlavaProcessorConfig:
        folder = Path(folder)
        processor = _read_json(folder / "processor_config.json")
        separate = folder / "preprocessor_config.json"
        nested = isinstance(processor, Mapping) and "image_processor" in processor
        preprocessor = None if nested or not separate.is_file() else _read_json(separate)
        return cls.from_dict(processor, preprocessor)

    def check_against(self, config: LlavaConfig) -> None:
        """The processor must expand each image to as many tokens as the model has features."""
        v, problems = config.vision, []
        if self.image.kind != config.model_type:
            problems.append(
                f"the processor is for {self.image.kind}, the model {config.model_type}"
            )
        if self.image.tile != (v.image_size, v.image_size):
            problems.append(f"tiles of {self.image.tile} pixels for a {v.image_size}-pixel tower")
        if self.patch_size != v.patch_size:
            problems.append(f"patch_size {self.patch_size}, the tower's is {v.patch_size}")
        if self.vision_feature_select_strategy != config.vision_feature_select_strategy:
            problems.append(
                f"strategy {self.vision_feature_select_strategy!r}, the model's is "
                f"{config.vision_feature_select_strategy!r}"
            )
        if self.num_additional_image_tokens != 1:
            problems.append(
                f"num_additional_image_tokens {self.num_additional_image_tokens} (CLIP has 1)"
            )
        if self.image.image_grid_pinpoints != config.image_grid_pinpoints:
            problems.append("image_grid_pinpoints differ from config.json's")
        if problems:
            raise MllamaExportError(
                "the processor config does not match config.json: " + "; ".join(problems)
            )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MllamaExportError(
            f"cannot read {path}: {exc.strerror or exc} (expected the checkpoint's "
            "processor_config.json, as LlavaProcessor.save_pretrained writes it)"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MllamaExportError(
            f"{path} is not valid JSON: {exc} (expected a JSON object)"
        ) from exc


def _check_keys(what: str, raw: Mapping[str, Any], required, allowed) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise MllamaExportError(
            f"{what} has unknown key(s) {unknown} (expected only {sorted(allowed)})"
        )
    missing = [key for key in required if key not in raw]
    if missing:
        raise MllamaExportError(
            f"{what} is missing required key(s) {missing} (expected all of {list(required)}; "
            f"it has {sorted(raw)})"
        )


def _image_processor_kind(raw: Mapping[str, Any]) -> str:
    name = raw.get("image_processor_type")
    base = name.removesuffix("Fast").removesuffix("Pil") if isinstance(name, str) else name
    if base not in IMAGE_PROCESSORS:
        raise _config_error(
            "image_processor_type", name, f"one of {list(IMAGE_PROCESSORS)} (LLaVA 1.5, NeXT)"
        )
    return IMAGE_PROCESSORS[base]


def _size(size: Any) -> tuple[tuple[str, int], ...]:
    expected = '{"shortest_edge": N} or {"height": H, "width": W} with positive integers'
    ok = isinstance(size, Mapping) and set(size) in ({"shortest_edge"}, {"height", "width"})
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size.values())
    if not ok:
        raise _config_error("size", size, expected)
    return tuple(sorted(size.items()))


def _crop_size(size: Any) -> tuple[int, int]:
    ok = isinstance(size, Mapping) and set(size) == {"height", "width"}
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size.values())
    if not ok:
        raise _config_error("crop_size", size, '{"height": H, "width": W} with positive integers')
    return size["height"], size["width"]


def _pinpoints(raw: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    value = raw["image_grid_pinpoints"]
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(p, list | tuple)
            and len(p) == 2
            and all(isinstance(v, int) and v > 0 for v in p)
            for p in value
        )
    )
    if not ok:
        raise _config_error("image_grid_pinpoints", value, "a list of [height, width] pairs")
    return tuple((int(h), int(w)) for h, w in value)


def _square(size: tuple[tuple[str, int], ...]) -> tuple[int, int]:
    d = dict(size)
    return (d["height"], d["width"]) if "height" in d else (d["shortest_edge"],) * 2


# --- pixels ---------------------------------------------------------------------------------


def shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): the short side to
    `edge`, the long side scaled and truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def _resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    # uint8 [H, W, 3] through Pillow, as the reference's numpy -> PIL -> numpy round trip
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def _resize_to(image: np.ndarray, size: tuple[tuple[str, int], ...], resample: int) -> np.ndarray:
    d = dict(size)
    if "shortest_edge" in d:
        return _resize(image, *shortest_edge_size(*image.shape[:2], d["shortest_edge"]), resample)
    return _resize(image, d["height"], d["width"], resample)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop: the centre, zero-padded where the image is smaller."""
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    canvas = np.zeros((new_h, new_w, *image.shape[2:]), dtype=image.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    canvas[pad_top : pad_top + h, pad_left : pad_left + w] = image
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def _finish_tile(tile: np.ndarray, c: LlavaImageConfig) -> np.ndarray:
    """Resize, crop and normalize one uint8 [H, W, 3] view -> float32 [3, h, w]."""
    if c.do_resize:
        tile = _resize_to(tile, c.size, c.resample)
    if c.do_center_crop:
        tile = center_crop(tile, *c.crop_size)
    table = _value_table(c)  # rescale and normalize, value by value, in the reference's dtypes
    return table[np.arange(3)[:, None, None], tile.transpose(2, 0, 1)]


def anyres_views(image: np.ndarray, c: LlavaImageConfig) -> list[np.ndarray]:
    """LLaVA-NeXT's uint8 views of one image: the whole image squashed to the tile size, then
    the tiles of the image fitted (aspect kept) and centred on its best pinpoint, row by row."""
    h, w = image.shape[:2]
    best_h, best_w = select_best_resolution(h, w, c.image_grid_pinpoints)
    scale_w, scale_h = best_w / w, best_h / h  # the reference's float order, for its ceil
    if scale_w < scale_h:
        new_h, new_w = min(math.ceil(h * scale_w), best_h), best_w
    else:
        new_h, new_w = best_h, min(math.ceil(w * scale_h), best_w)
    canvas = np.zeros((best_h, best_w, 3), dtype=np.uint8)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = _resize(image, new_h, new_w, c.resample)
    side = c.crop_size[0] if c.crop_size else _square(c.size)[0]
    tiles = [
        canvas[i : i + side, j : j + side]
        for i in range(0, best_h, side)
        for j in range(0, best_w, side)
    ]
    return [_resize(image, *_square(c.size), c.resample), *tiles]


def preprocess_image(
    source: ImageSource, c: LlavaImageConfig
) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> (float32 [tiles, 3, h, w], its (height, width) as image_sizes holds it)."""
    image = load_image(source, convert_rgb=c.do_convert_rgb)
    if image.mode != "RGB":
        raise MllamaExportError(
            f"image has mode {image.mode!r} and the config says do_convert_rgb=false (expected "
            "an RGB image, or do_convert_rgb=true)"
        )
    pixels = np.asarray(image)
    views = anyres_views(pixels, c) if c.kind == "llava_next" else [pixels]
    return np.stack([_finish_tile(v, c) for v in views]), (image.height, image.width)


@dataclass
class LlavaImages:
    """The vision graph's input for a batch: every tile of every image, in prompt order."""

    pixel_values: np.ndarray  # float32 [num_tiles, 3, H, W]
    image_sizes: list[list[tuple[int, int]]]  # per prompt: (height, width) of each image
    num_tiles: list[list[int]]  # per prompt: tiles of each image


def preprocess_llava(
    images: Sequence[Sequence[ImageSource]], config: LlavaImageConfig
) -> LlavaImages:
    """Rows of images (paths, bytes or PIL images), one row per prompt, possibly empty."""
    if not isinstance(images, list | tuple) or not all(isinstance(r, list | tuple) for r in images):
        raise MllamaExportError(
            f"images is {type(images).__name__} {images!r:.80} (expected a list of rows, each a "
            "list of images)"
        )
    done = [[preprocess_image(source, config) for source in row] for row in images]
    h, w = config.tile or (0, 0)
    tiles = [t for row in done for t, _ in row]
    pixels = np.concatenate(tiles) if tiles else np.zeros((0, 3, h, w), np.float32)
    return LlavaImages(
        pixel_values=pixels,
        image_sizes=[[size for _, size in row] for row in done],
        num_tiles=[[len(t) for t, _ in row] for row in done],
    )
