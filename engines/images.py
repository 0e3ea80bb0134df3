"""Images for every family that takes them: decoding (paths, bytes, PIL images; EXIF upright;
RGB as transformers makes it; every failure one line naming the image) and the per-key readers
of a preprocessor_config.json. Mllama's tiling (engines/preprocess.py) and LLaVA's CLIP and
anyres processing (engines/llava_preprocess.py) both build on these."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mllama_export.errors import MllamaExportError
from mllama_export.graphs import strict

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image

# Pillow's own hard limit (2 x its default MAX_IMAGE_PIXELS); enforced here too so that a caller
# who disabled Pillow's guard (Image.MAX_IMAGE_PIXELS = None) is still protected.
MAX_IMAGE_PIXELS = 2 * 89_478_485

# PIL.Image.Resampling values, the integers transformers writes as "resample".
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

_DECODABLE = "an image file Pillow can decode (PNG, JPEG, GIF, BMP, WebP, TIFF, ...)"
_CHANNELS = np.arange(3)[:, None, None]
_WHERE = "preprocessor config"


def _config_error(key: str, value: Any, expected: str) -> MllamaExportError:
    return strict.wrong(f"{_WHERE}: {key}", value, expected)


def _triple_check(allow_zero: bool) -> strict.Check:
    expected = "3 numbers, one per RGB channel" + ("" if allow_zero else ", none zero")

    def check(value: Any) -> tuple[float, float, float]:
        ok = isinstance(value, list | tuple) and len(value) == 3
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if not ok or (not allow_zero and any(v == 0 for v in value)):
            raise strict.Wrong(expected)
        return (float(value[0]), float(value[1]), float(value[2]))

    return check


def _resample_check(value: Any) -> int:
    if isinstance(value, bool) or value not in RESAMPLE_NAMES:
        raise strict.Wrong(f"a PIL resampling filter, one of {RESAMPLE_NAMES}")
    return int(value)


_POSITIVE_INT = strict.integer(minimum=1, floats=False)
_POSITIVE = strict.number(positive=True)
_MEAN, _STD = _triple_check(allow_zero=True), _triple_check(allow_zero=False)


# Per-key readers that LLaVA's preprocessing (engines/llava_preprocess.py) shares.
def _value(config: Mapping[str, Any], key: str, check: strict.Check) -> Any:
    try:
        return check(config[key])
    except strict.Wrong as err:
        raise _config_error(key, config[key], str(err)) from None


def _bool(config: Mapping[str, Any], key: str) -> bool:
    return _value(config, key, strict.boolean)


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    return _value(config, key, _POSITIVE_INT)


def _positive_float(config: Mapping[str, Any], key: str) -> float:
    return _value(config, key, _POSITIVE)


def _triple(config: Mapping[str, Any], key: str, allow_zero: bool) -> tuple[float, float, float]:
    return _value(config, key, _MEAN if allow_zero else _STD)


def _resample(value: Any) -> int:
    return _value({"resample": value}, "resample", _resample_check)


def load_image(source: ImageSource, convert_rgb: bool = True) -> Image.Image:
    """Decode ``source`` (path, bytes or PIL image), turn it upright by EXIF, and make it RGB."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = _upright(source, name)
    elif isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise _read_error(name, "the data is empty (0 bytes)")
        image = _decode(io.BytesIO(bytes(source)), name)
    elif isinstance(source, str | os.PathLike):
        image = _decode(_checked_path(source, name), name)
    else:
        raise MllamaExportError(
            f"cannot read image {name} (expected a file path, bytes or a PIL.Image.Image)"
        )
    if image.width == 0 or image.height == 0:
        raise _read_error(name, f"it is {image.width}x{image.height} pixels", "a non-empty image")
    return convert_to_rgb(image, name) if convert_rgb else image


def convert_to_rgb(image: Image.Image, name: str = "<image>") -> Image.Image:
    """RGB exactly as transformers' ``convert_to_rgb``: transparency is composited onto white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if not has_alpha:
            return image.convert("RGB")
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    except ValueError as exc:
        raise MllamaExportError(
            f"cannot convert image {name} from mode {image.mode!r} to RGB: {exc} "
            "(expected a mode Pillow converts, e.g. RGB, RGBA, L, LA, P, PA, CMYK, I;16, 1)"
        ) from exc


def _describe(source: object) -> str:
    if isinstance(source, Image.Image):
        return f"<PIL image, mode {source.mode}, {source.width}x{source.height}>"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    if isinstance(source, str | os.PathLike):
        return f"'{os.fspath(source)}'"
    return f"of type {type(source).__name__}"


def _read_error(name: str, problem: str, expected: str = _DECODABLE) -> MllamaExportError:
    return MllamaExportError(f"cannot read image {name}: {problem} (expected {expected})")


def _checked_path(source: str | os.PathLike, name: str) -> Path:
    path = Path(source)
    if not path.exists():
        raise _read_error(name, "no such file", "an existing image file")
    if path.is_dir():
        raise _read_error(name, "it is a directory", "an image file")
    if path.stat().st_size == 0:
        raise _read_error(name, "the file is empty (0 bytes)")
    return path


def _upright(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # Pillow's EXIF parser raises assorted types on malformed tags.
        raise _read_error(name, f"its EXIF data is corrupt ({exc})") from exc


def _decode(fp: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns between its soft and hard limits; MAX_IMAGE_PIXELS is our one limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                _check_pixel_count(image, name)
                image.load()
                return _upright(image, name)
    except MllamaExportError:
        raise
    except Image.DecompressionBombError as exc:
        raise _read_error(name, str(exc), f"at most {MAX_IMAGE_PIXELS:,} pixels") from exc
    except UnidentifiedImageError as exc:
        raise _read_error(name, "it is not in a recognised image format") from exc
    except OSError as exc:
        if exc.errno is not None:
            raise _read_error(name, exc.strerror or str(exc), "a readable image file") from exc
        problem = "the file is truncated" if "truncated" in str(exc) else f"corrupt data ({exc})"
        raise _read_error(name, problem) from exc
    except (
        Exception
    ) as exc:  # Decoders raise SyntaxError, struct.error, zlib.error, ... on bad data.
        raise _read_error(name, f"corrupt data ({type(exc).__name__}: {exc})") from exc


def _check_pixel_count(image: Image.Image, name: str) -> None:
    pixels = image.width * image.height
    if pixels > MAX_IMAGE_PIXELS:
        raise _read_error(
            name,
            f"its header says {image.width}x{image.height} = {pixels:,} pixels, a possible "
            "decompression bomb",
            f"at most {MAX_IMAGE_PIXELS:,} pixels",
        )


def _value_table(config: Any) -> np.ndarray:
    """float32 [3, 256]: each channel's output for each uint8 input.

    Rescale and normalize are per-value functions, so a lookup table computed with the reference's
    exact dtypes (float64 rescale cast to float32, then float32 normalize) gives identical bits.
    """
    values = np.tile(np.arange(256, dtype=np.uint8), (3, 1))
    if config.do_rescale:
        table = (values.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        table = values.astype(np.float32)
    if config.do_normalize:
        mean = np.array(config.image_mean, dtype=np.float32)[:, None]
        std = np.array(config.image_std, dtype=np.float32)[:, None]
        table = (table - mean) / std
    return table
