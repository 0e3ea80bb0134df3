"""engines.preprocess against transformers' MllamaImageProcessor (PIL backend), and its errors."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from imagefiles import bomb_png, png_bytes
from PIL import Image, ImageOps

from mllama_export.engines import preprocess as pp
from mllama_export.engines.images import MAX_IMAGE_PIXELS
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.synth_files import CLIP_MEAN, CLIP_STD, default_preprocessor_config

SEED = 20240925
ORIENTATION = 0x0112


def _config(tile: int, tiles: int, **overrides: Any) -> dict[str, Any]:
    return {**default_preprocessor_config(tile, tiles), **overrides}


# Index 0 is the real checkpoint's setting; the small tiles keep the many small cases fast and the
# variants exercise each resampling filter and the rescale/normalize switches.
CONFIGS = [
    _config(560, 4),
    _config(32, 4),
    _config(48, 6, resample=3),
    _config(40, 8, resample=1),
    _config(64, 4, resample=0),
    _config(28, 2, do_normalize=False),
    _config(36, 3, do_rescale=False),
    _config(24, 9, resample=5),
    _config(30, 5, resample=4, do_rescale=False, do_normalize=False),
]

# mode -> storages it can be written to; "Pt"/"Lt"/"RGBt" carry a PNG tRNS transparency.
MODES = {
    "RGB": ("png", "jpeg", "memory"),
    "RGBA": ("png", "memory"),
    "LA": ("png", "memory"),
    "L": ("png", "jpeg", "memory"),
    "P": ("png", "memory"),
    "Pt": ("png", "memory"),
    "PA": ("memory",),
    "CMYK": ("jpeg", "memory"),
    "I;16": ("png", "memory"),
    "1": ("png", "memory"),
    "RGBt": ("png",),
    "Lt": ("png",),
}

EDGE_SIZES = [(1, 1), (1, 2), (2, 1), (1, 40), (40, 1), (3, 7), (31, 31), (32, 32), (33, 33)]
EDGE_SIZES += [(47, 48), (48, 49), (64, 64), (65, 64), (100, 1), (1, 100), (560, 560), (561, 561)]
BIG_SIZES = [(4000, 300), (300, 4000), (1500, 1500), (4000, 250), (200, 3000)]


@dataclasses.dataclass(frozen=True)
class Case:
    index: int
    mode: str
    size: tuple[int, int]  # (width, height) as Pillow counts
    storage: str  # png, jpeg or memory
    orientation: int | None
    as_bytes: bool
    config: int

    @property
    def id(self) -> str:
        w, h = self.size
        tail = f"-exif{self.orientation}" if self.orientation else ""
        return f"{self.index}-{self.mode}-{w}x{h}-{self.storage}{tail}-cfg{self.config}"


def _cases() -> list[Case]:
    rng = np.random.default_rng(SEED)
    random_sizes = [
        tuple(int(v) for v in np.exp(rng.uniform(0, np.log(900), 2))) for _ in range(200)
    ]
    sizes = EDGE_SIZES + BIG_SIZES + random_sizes
    modes = list(MODES)
    cases = []
    files_seen = {"png": 0, "jpeg": 0}
    for index, size in enumerate(sizes):
        mode = modes[index % len(modes)]
        storage = MODES[mode][int(rng.integers(len(MODES[mode])))]
        orientation = None
        if storage != "memory":
            # Every other file gets an EXIF orientation, cycling 2..8 per format.
            seen = files_seen[storage] = files_seen[storage] + 1
            orientation = 2 + (seen // 2) % 7 if seen % 2 else None
        big = size in BIG_SIZES or max(size) > 500
        config = int(rng.choice([0, 1])) if big else int(rng.integers(1, len(CONFIGS)))
        as_bytes = storage != "memory" and index % 3 == 0
        cases.append(Case(index, mode, size, storage, orientation, as_bytes, config))
    return cases


CASES = _cases()


def _make_image(case: Case) -> Image.Image:
    rng = np.random.default_rng([SEED, case.index])
    w, h = case.size
    mode = case.mode.removesuffix("t")

    def noise(channels: int) -> bytes:
        return rng.integers(0, 256, (h, w, channels), dtype=np.uint8).tobytes()

    if mode == "I;16":
        return Image.frombytes(mode, (w, h), rng.integers(0, 700, (h, w)).astype("<u2").tobytes())
    if mode == "1":
        return Image.frombytes("L", (w, h), noise(1)).convert("1")
    if mode in ("P", "PA"):
        image = Image.frombytes("P", (w, h), noise(1))
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if mode == "PA":
            image = image.convert("PA")
            image.putalpha(Image.frombytes("L", (w, h), noise(1)))
        return image
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1, "CMYK": 4}[mode]
    return Image.frombytes(mode, (w, h), noise(channels))


def _transparency(case: Case, image: Image.Image) -> Any:
    if case.mode in ("Pt", "Lt", "RGBt"):
        return image.getpixel((0, 0))  # a colour that occurs, so the transparency matters
    return None


def _materialize(case: Case, tmp_path: Path) -> tuple[Any, Image.Image]:
    """Return (what we feed our preprocess, what we feed the reference)."""
    image = _make_image(case)
    transparency = _transparency(case, image)
    if case.storage == "memory":
        if transparency is not None:
            image.info["transparency"] = transparency
        return image, image
    path = tmp_path / f"img.{case.storage}"
    kwargs: dict[str, Any] = {}
    if transparency is not None:
        kwargs["transparency"] = transparency
    if case.orientation:
        exif = Image.Exif()
        exif[ORIENTATION] = case.orientation
        kwargs["exif"] = exif
    image.save(path, format=case.storage.upper(), **kwargs)
    # The reference ignores EXIF, so it gets the image already turned upright.
    reference = ImageOps.exif_transpose(Image.open(path))
    return (path.read_bytes() if case.as_bytes else path), reference


@functools.cache
def _reference_processor(config_index: int) -> Any:
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    config = CONFIGS[config_index]
    return MllamaImageProcessorPil(**{k: v for k, v in config.items() if k not in pp.HARMLESS_KEYS})


def _assert_same(ours: pp.PreprocessedImages, reference: Any) -> None:
    ref_pixels = np.asarray(reference["pixel_values"])
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref_pixels.shape
    diff = np.abs(ours.pixel_values - ref_pixels).max() if ref_pixels.size else 0.0
    assert diff < 1e-5, f"max abs pixel difference {diff}"
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        ours_value, ref_value = getattr(ours, key), np.asarray(reference[key])
        assert ours_value.dtype == np.int64
        np.testing.assert_array_equal(ours_value, ref_value, err_msg=key)
    assert ours.num_tiles == reference["num_tiles"]


def test_generated_cases_cover_the_brief() -> None:
    assert len(CASES) >= 200
    assert {c.mode for c in CASES} == set(MODES)
    assert {c.orientation for c in CASES if c.storage == "png"} >= set(range(2, 9))
    assert {c.orientation for c in CASES if c.storage == "jpeg"} >= set(range(2, 9))
    assert {c.size for c in CASES} >= {(1, 1), (4000, 300), (300, 4000), (1500, 1500)}
    assert any(c.as_bytes for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference(case: Case, tmp_path: Path) -> None:
    ours_input, reference_input = _materialize(case, tmp_path)
    config = pp.ImageProcessorConfig.from_dict(CONFIGS[case.config])
    ours = pp.preprocess([[ours_input]], config)
    reference = _reference_processor(case.config)([[reference_input]])
    _assert_same(ours, reference)
    if case.orientation in (5, 6, 7, 8):
        # Orientations 5-8 swap the axes, so honouring EXIF must transpose the size.
        assert pp.load_image(ours_input).size == case.size[::-1]


def _small_images() -> list[Image.Image]:
    rng = np.random.default_rng(SEED)
    sizes = [(50, 20), (20, 90), (33, 33), (1, 1), (200, 40)]
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes
    ]


@pytest.mark.parametrize("config_index", [1, 3])
@pytest.mark.parametrize(
    "layout",
    [[[0]], [[0, 1]], [[0, 1], [], [2]], [[], [3]], [[4], [0, 1]], [[2], [3, 4], [1]]],
    ids=str,
)
def test_batches_with_uneven_rows_match_reference(layout: list[list[int]], config_index: int):
    images = _small_images()
    batch = [[images[i] for i in row] for row in layout]
    config = pp.ImageProcessorConfig.from_dict(CONFIGS[config_index])
    ours = pp.preprocess(batch, config)
    _assert_same(ours, _reference_processor(config_index)(batch))
    assert ours.pixel_values.shape[:3] == (
        len(layout),
        max(len(r) for r in layout),
        config.max_image_tiles,
    )
    for b, row in enumerate(layout):
        assert (ours.aspect_ratio_ids[b, len(row) :] == 0).all()
        assert (ours.pixel_values[b, len(row) :] == 0).all()


def test_mixed_sources_in_one_batch(tmp_path: Path) -> None:
    images = _small_images()
    path = tmp_path / "a.png"
    images[0].save(path)
    config = pp.ImageProcessorConfig.from_dict(CONFIGS[1])
    ours = pp.preprocess([[path, str(path), path.read_bytes(), images[0]]], config)
    reference = _reference_processor(1)([[images[0]] * 4])
    _assert_same(ours, reference)


def test_no_rgb_conversion_matches_reference_on_rgb_and_rejects_grey() -> None:
    cfg = _config(32, 4, do_convert_rgb=False)
    config = pp.ImageProcessorConfig.from_dict(cfg)
    images = _small_images()[:2]
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    reference = MllamaImageProcessorPil(**{k: v for k, v in cfg.items() if k in pp.REQUIRED_KEYS})
    _assert_same(pp.preprocess([images], config), reference([images]))
    with pytest.raises(MllamaExportError, match="mode 'L'.*do_convert_rgb"):
        pp.preprocess([[images[0].convert("L")]], config)


def test_canvas_choice_matches_reference() -> None:
    from transformers.models.mllama import image_processing_pil_mllama as ref

    lengths = sorted(
        {1, 2, 31, 32, 33, 300, 559, 560, 561, 1119, 1121, 4000, 5000} | set(range(1, 2000, 97))
    )
    for tile in (32, 560):
        for max_tiles in range(1, 9):
            ratios = ref.get_all_supported_aspect_ratios(max_tiles)
            assert list(pp.supported_aspect_ratios(max_tiles)) == ratios
            for h in lengths:
                for w in lengths:
                    canvas = tuple(
                        int(v) for v in ref.get_optimal_tiled_canvas(h, w, max_tiles, tile)
                    )
                    assert pp.optimal_tiled_canvas(h, w, max_tiles, tile) == canvas, (h, w)
                    fit = ref.get_image_size_fit_to_canvas(h, w, *canvas, tile)
                    assert pp.fit_to_canvas(h, w, *canvas, tile) == tuple(int(v) for v in fit)


# --- configuration ---------------------------------------------------------------------------


def test_default_config_round_trips() -> None:
    raw = default_preprocessor_config(560, 4)
    config = pp.ImageProcessorConfig.from_dict(raw)
    assert config.size == {"height": 560, "width": 560} and config.tile_size == 560
    assert config.image_mean == CLIP_MEAN and config.image_std == CLIP_STD
    assert (config.resample, config.rescale_factor, config.max_image_tiles) == (2, 1 / 255, 4)
    assert config.do_convert_rgb and config.do_rescale and config.do_normalize
    assert config.supported_aspect_ratios[:5] == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1))
    assert len(config.supported_aspect_ratios) == 8
    assert raw["image_processor_type"] == "MllamaImageProcessor"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_image_tiles = 2  # type: ignore[misc]


def test_reads_what_transformers_saves(tmp_path: Path) -> None:
    reference = _reference_processor(0)
    reference.save_pretrained(tmp_path)
    config = pp.ImageProcessorConfig.from_file(tmp_path / "preprocessor_config.json")
    assert config == pp.ImageProcessorConfig.from_dict(CONFIGS[0])


def test_harmless_keys_are_accepted() -> None:
    raw = {**CONFIGS[1], "_processor_class": "MllamaProcessor", "feature_extractor_type": "x"}
    assert pp.ImageProcessorConfig.from_dict(raw).tile_size == 32


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(MllamaExportError, match=r"unknown key\(s\) \['crop_size'\].*harmless"):
        pp.ImageProcessorConfig.from_dict({**CONFIGS[0], "crop_size": {"height": 1, "width": 1}})


@pytest.mark.parametrize("key", pp.REQUIRED_KEYS)
def test_missing_key_is_an_error(key: str) -> None:
    raw = {k: v for k, v in CONFIGS[0].items() if k != key}
    with pytest.raises(MllamaExportError, match=rf"missing required key\(s\) \['{key}'\]"):
        pp.ImageProcessorConfig.from_dict(raw)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("size", {"height": 560, "width": 448}, "square"),
        ("size", {"shortest_edge": 560}, "square"),
        ("do_pad", False, "supports no other mode"),
        ("do_resize", False, "supports no other mode"),
        ("do_rescale", "yes", "true or false"),
        ("image_mean", [0.5, 0.5], "3 numbers"),
        ("image_std", [0.5, 0.0, 0.5], "none zero"),
        ("resample", 9, "resampling filter"),
        ("max_image_tiles", 0, "positive integer"),
        ("rescale_factor", "1/255", "positive number"),
        ("image_processor_type", "CLIPImageProcessor", "MllamaImageProcessor"),
    ],
)
def test_bad_config_values_are_errors(key: str, value: Any, fragment: str) -> None:
    with pytest.raises(MllamaExportError, match=key) as info:
        pp.ImageProcessorConfig.from_dict({**CONFIGS[0], key: value})
    assert fragment in str(info.value)


def test_bad_config_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(MllamaExportError, match="cannot read preprocessor config"):
        pp.ImageProcessorConfig.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MllamaExportError, match="not valid JSON"):
        pp.ImageProcessorConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(MllamaExportError, match="expected a JSON object"):
        pp.ImageProcessorConfig.from_file(tmp_path / "list.json")


# --- bad images ------------------------------------------------------------------------------


def _read_error(source: Any) -> str:
    with pytest.raises(MllamaExportError) as info:
        pp.load_image(source)
    assert type(info.value) is MllamaExportError
    return str(info.value)


def test_truncated_files(tmp_path: Path) -> None:
    png = tmp_path / "cut.png"
    png.write_bytes(png_bytes()[:600])
    message = _read_error(png)
    assert f"cannot read image '{png}'" in message and "truncated" in message
    assert "expected an image file Pillow can decode" in message
    jpeg = tmp_path / "cut.jpg"
    Image.effect_noise((64, 64), 60).save(jpeg, format="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:700])
    assert "truncated" in _read_error(jpeg)


def test_corrupt_file(tmp_path: Path) -> None:
    data = bytearray(png_bytes())
    data[100:140] = bytes(40)  # inside the IDAT chunk: breaks its CRC and the zlib stream
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    assert "corrupt data" in _read_error(path)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a picture\n")
    assert "not in a recognised image format" in _read_error(path)
    assert "not in a recognised image format" in _read_error(b"hello world")


def test_empty_file_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty (0 bytes)" in _read_error(path)
    assert "empty (0 bytes)" in _read_error(b"")


def test_missing_path_and_directory(tmp_path: Path) -> None:
    message = _read_error(tmp_path / "missing.png")
    assert "missing.png" in message and "no such file" in message and "existing image" in message
    assert "is a directory" in _read_error(tmp_path)
    with pytest.raises(MllamaExportError, match="no such file"):
        pp.preprocess([[tmp_path / "missing.png"]], pp.ImageProcessorConfig.from_dict(CONFIGS[1]))


@pytest.mark.parametrize("pillow_guard", [True, False])
def test_decompression_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pillow_guard: bool
) -> None:
    if not pillow_guard:
        # Our own limit must hold even when a caller switched Pillow's off.
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(30000))
    assert path.stat().st_size < 100
    start = time.perf_counter()
    message = _read_error(path)
    assert time.perf_counter() - start < 1.0
    assert "bomb" in message and f"at most {MAX_IMAGE_PIXELS:,} pixels" in message
    assert ("900000000 pixels" if pillow_guard else "30000x30000 = 900,000,000") in message


def test_unsupported_inputs() -> None:
    assert "expected a file path, bytes or a PIL.Image.Image" in _read_error(123)
    assert "0x5 pixels" in _read_error(Image.new("RGB", (0, 5)))
    assert "from mode 'La' to RGB" in _read_error(Image.new("La", (4, 4)))
    config = pp.ImageProcessorConfig.from_dict(CONFIGS[1])
    with pytest.raises(MllamaExportError, match="all empty"):
        pp.preprocess([[], []], config)
    with pytest.raises(MllamaExportError, match="list of rows"):
        pp.preprocess([Image.new("RGB", (4, 4))], config)  # type: ignore[list-item]
