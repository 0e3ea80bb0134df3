"""engines.llava_preprocess and engines.llava_text against transformers' CLIPImageProcessor,
LlavaNextImageProcessor (PIL backend), LlavaProcessor and LlavaNextProcessor."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_preprocess import MODES, SEED, Case, _materialize

from mllama_export.engines import llava_preprocess as lp
from mllama_export.engines.llava_text import (
    encode_llava_prompt,
    expand_image_tokens,
    processor_token_count,
)
from mllama_export.engines.text import Tokenizer
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.llava_presets import llava_preset
from mllama_export.graphs.synth_files import _train_bpe

transformers = pytest.importorskip("transformers")

CLIP = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 336},
}
NEXT = {
    **CLIP,
    "image_processor_type": "LlavaNextImageProcessor",
    "do_pad": True,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
}


def small(base: dict, tile: int, pinpoints=None, **overrides) -> dict:
    out = {**base, "crop_size": {"height": tile, "width": tile}, "size": {"shortest_edge": tile}}
    if pinpoints is not None:
        out["image_grid_pinpoints"] = pinpoints
    return {**out, **overrides}


# Index 0 of each is the published checkpoints' setting; the small ones keep the many cases fast
# and vary each step: resampling filter, a resize larger than the crop, a crop larger than the
# resize (zero padding), a fixed-size resize, no crop, no rescale, no normalize.
CLIP_CONFIGS = [
    CLIP,
    small(CLIP, 28),
    small(CLIP, 30, size={"shortest_edge": 37}, resample=2),
    small(CLIP, 40, size={"shortest_edge": 26}, resample=1),
    small(CLIP, 24, size={"height": 31, "width": 44}, resample=0),
    small(CLIP, 32, size={"height": 32, "width": 32}, do_center_crop=False),
    small(CLIP, 28, do_rescale=False, resample=4),
    small(CLIP, 36, do_normalize=False, resample=5),
]
NEXT_CONFIGS = [
    NEXT,
    small(NEXT, 28, [[56, 28], [28, 56], [56, 56], [28, 28], [28, 112]]),
    small(NEXT, 32, [[64, 32], [32, 64], [64, 64], [96, 32], [32, 96]], resample=2),
    small(NEXT, 24, [[48, 24], [24, 72], [72, 72], [24, 24]], size={"shortest_edge": 30}),
    small(NEXT, 20, [[40, 60], [60, 40], [20, 100]], do_normalize=False, resample=1),
]

EDGE_SIZES = [(1, 1), (1, 2), (2, 1), (1, 40), (40, 1), (3, 7), (27, 28), (28, 28), (29, 28)]
EDGE_SIZES += [(56, 28), (28, 56), (100, 1), (1, 100), (336, 336), (337, 335), (672, 336)]
BIG_SIZES = [(4000, 300), (300, 4000), (1500, 1500), (2000, 90)]


def _cases() -> list[tuple[Case, int, int]]:
    """(image case, CLIP config, NeXT config): every mode, storage, EXIF orientation and size."""
    rng = np.random.default_rng(SEED + 1)
    random_sizes = [
        tuple(int(v) for v in np.exp(rng.uniform(0, np.log(700), 2))) for _ in range(190)
    ]
    modes = list(MODES)
    files_seen = {"png": 0, "jpeg": 0}
    cases = []
    for index, size in enumerate(EDGE_SIZES + BIG_SIZES + random_sizes):
        mode = modes[index % len(modes)]
        storage = MODES[mode][int(rng.integers(len(MODES[mode])))]
        orientation = None
        if storage != "memory":
            seen = files_seen[storage] = files_seen[storage] + 1
            orientation = 2 + (seen // 2) % 7 if seen % 2 else None
        big = size in BIG_SIZES or max(size) > 400
        clip = int(rng.choice([0, 1])) if big else int(rng.integers(1, len(CLIP_CONFIGS)))
        nxt = int(rng.choice([0, 1])) if big else int(rng.integers(1, len(NEXT_CONFIGS)))
        image = Case(
            index, mode, size, storage, orientation, storage != "memory" and index % 3 == 0, 0
        )
        cases.append((image, clip, nxt))
    return cases


CASES = _cases()


@functools.cache
def reference(kind: str, index: int) -> Any:
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil

    raw = (CLIP_CONFIGS if kind == "llava" else NEXT_CONFIGS)[index]
    cls = CLIPImageProcessorPil if kind == "llava" else LlavaNextImageProcessorPil
    return cls(**{k: v for k, v in raw.items() if k != "image_processor_type"})


def ours(kind: str, index: int) -> lp.LlavaImageConfig:
    return lp.LlavaImageConfig.from_dict((CLIP_CONFIGS if kind == "llava" else NEXT_CONFIGS)[index])


def assert_same_pixels(got: lp.LlavaImages, ref: Any, kind: str) -> None:
    pixels = np.asarray(ref["pixel_values"])
    if kind == "llava_next":  # [images, most tiles, C, H, W], zero-padded: ours are flat
        tiles = [n for row in got.num_tiles for n in row]
        assert all((pixels[i, n:] == 0).all() for i, n in enumerate(tiles))
        pixels = np.concatenate([pixels[i, :n] for i, n in enumerate(tiles)])
        sizes = [tuple(int(v) for v in s) for s in np.asarray(ref["image_sizes"])]
        assert [s for row in got.image_sizes for s in row] == sizes
    assert got.pixel_values.dtype == np.float32 and got.pixel_values.shape == pixels.shape
    diff = np.abs(got.pixel_values - pixels).max() if pixels.size else 0.0
    assert diff < 1e-5, f"max abs pixel difference {diff}"


def test_cases_cover_every_mode_storage_and_orientation():
    images = [c for c, _, _ in CASES]
    assert len(images) >= 200 and {c.mode for c in images} == set(MODES)
    for storage in ("png", "jpeg"):
        assert {c.orientation for c in images if c.storage == storage} >= set(range(2, 9))
    assert {c for _, c, _ in CASES} == set(range(len(CLIP_CONFIGS)))
    assert {c for _, _, c in CASES} == set(range(len(NEXT_CONFIGS)))


@pytest.mark.parametrize(
    "case, clip, nxt",
    CASES,
    ids=[f"{c.index}-{c.mode}-{c.size[0]}x{c.size[1]}-{c.storage}" for c, _, _ in CASES],
)
def test_matches_the_image_processors(case, clip, nxt, tmp_path):
    source, upright = _materialize(case, tmp_path)
    for kind, index in (("llava", clip), ("llava_next", nxt)):
        got = lp.preprocess_llava([[source]], ours(kind, index))
        assert_same_pixels(got, reference(kind, index)([upright]), kind)
        assert got.image_sizes == [[(upright.height, upright.width)]]


def test_a_batch_of_rows_keeps_prompt_order():
    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(40, 90), (70, 30), (28, 28)]
    ]
    for kind in ("llava", "llava_next"):
        got = lp.preprocess_llava([[images[0]], [], images[1:]], ours(kind, 1))
        assert_same_pixels(got, reference(kind, 1)(images), kind)
        assert len(got.image_sizes) == 3 and got.image_sizes[1] == []


# --- processors: token counts and ids -------------------------------------------------------


def _tokenizer() -> Any:
    import tokenizers
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(300)
    tok.add_special_tokens(
        [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t in ("<s>", "</s>", "<unk>", "<image>", "<pad>")
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 300)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(
    scope="module",
    params=[
        ("llava", 1, "default"),
        ("llava", 2, "full"),
        ("llava_next", 1, "default"),
        ("llava_next", 3, "default"),
    ],
    ids=str,
)
def processor(request, tmp_path_factory):
    """transformers' processor, saved by transformers (5.x nests the image settings)."""
    kind, index, strategy = request.param
    cls = transformers.LlavaProcessor if kind == "llava" else transformers.LlavaNextProcessor
    proc = cls(
        reference(kind, index),
        _tokenizer(),
        patch_size=7 if index == 2 else 14,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    folder = tmp_path_factory.mktemp("processor")
    proc.save_pretrained(folder)
    return transformers.AutoProcessor.from_pretrained(folder), folder


def test_processor_config_reads_what_transformers_saves(processor):
    proc, folder = processor
    ours_config = lp.LlavaProcessorConfig.from_dir(folder)
    assert (ours_config.patch_size, ours_config.image_token) == (proc.patch_size, proc.image_token)
    assert ours_config.vision_feature_select_strategy == proc.vision_feature_select_strategy
    assert ours_config.num_additional_image_tokens == 1


def test_prompts_match_the_processor(processor):
    proc, folder = processor
    config, tokenizer = lp.LlavaProcessorConfig.from_dir(folder), Tokenizer.from_dir(folder)
    rng = np.random.default_rng(7)
    for trial in range(12):
        sizes = [
            tuple(int(v) for v in np.exp(rng.uniform(0, np.log(400), 2))) for _ in range(trial % 3)
        ]
        images = [
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes
        ]
        parts = [{"type": "image"} for _ in images] + [
            {"type": "text", "text": f"what is {trial}?"}
        ]
        messages = [{"role": "user", "content": parts[::-1] if trial % 2 else parts}]
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        assert tokenizer.apply_chat_template(messages) == text
        ref = proc(images=images or None, text=[text])
        got = lp.preprocess_llava([images], config.image)
        ids = encode_llava_prompt(tokenizer, text, got.image_sizes[0], config)
        assert ids == list(ref["input_ids"][0])
        if images:
            assert_same_pixels(got, ref, config.image.kind)
        counts = [processor_token_count(config, s) for s in got.image_sizes[0]]
        assert ids.count(proc.image_token_id) == sum(counts)


def test_token_counts_match_llava_next_processor():
    proc = transformers.LlavaNextProcessor(
        reference("llava_next", 0),
        _tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = lp.LlavaProcessorConfig(ours("llava_next", 0), 14, "default", 1, "<image>")
    for h in [1, 2, 50, 335, 336, 337, 500, 671, 672, 1000, 1008, 1500, 4000]:
        for w in [1, 3, 100, 336, 337, 600, 672, 999, 1008, 3000]:
            expected = proc._get_number_of_features(h, w, 336, 336) - 1
            assert processor_token_count(config, (h, w)) == expected, (h, w)


def test_wrong_placeholder_count_is_refused():
    config = lp.LlavaProcessorConfig(ours("llava", 1), 14, "default", 1, "<image>")
    with pytest.raises(MllamaExportError, match="2 <image> placeholders but 1 images"):
        expand_image_tokens("<image> and <image>", [(10, 10)], config)


# --- strict settings ------------------------------------------------------------------------


def test_published_layout_reads_the_same(processor, tmp_path):
    proc, folder = processor
    nested = json.loads((folder / "processor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({**nested.pop("image_processor"), "processor_class": nested["processor_class"]})
    )
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert lp.LlavaProcessorConfig.from_dir(tmp_path) == lp.LlavaProcessorConfig.from_dir(folder)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r.update(foo=1), r"unknown key\(s\) \['foo'\]"),
        (lambda r: r.pop("crop_size"), r"missing required key\(s\) \['crop_size'\]"),
        (
            lambda r: r.pop("image_grid_pinpoints"),
            r"missing required key\(s\) \['image_grid_pinpoints'\]",
        ),
        (lambda r: r.update(image_processor_type="SiglipImageProcessor"), "image_processor_type"),
        (lambda r: r.update(size={"longest_edge": 3}), "size"),
        (lambda r: r.update(crop_size={"height": 0, "width": 3}), "crop_size"),
        (lambda r: r.update(resample=11), "resample"),
        (lambda r: r.update(image_grid_pinpoints=[[336]]), "image_grid_pinpoints"),
        (lambda r: r.update(do_rescale="yes"), "true or false"),
    ],
    ids=[
        "unknown",
        "missing",
        "missing-pinpoints",
        "processor-type",
        "size",
        "crop",
        "resample",
        "pinpoints",
        "bool",
    ],
)
def test_image_settings_are_strict(mutate, fragment):
    raw = dict(NEXT)
    mutate(raw)
    with pytest.raises(MllamaExportError, match=fragment):
        lp.LlavaImageConfig.from_dict(raw)


PROCESSOR = {
    "image_token": "<image>",
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "default",
}


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r.update(extra=1), r"unknown key\(s\) \['extra'\]"),
        (lambda r: r.pop("num_additional_image_tokens"), "missing required key"),
        (lambda r: r.pop("patch_size"), "missing required key"),
        (
            lambda r: r.update(vision_feature_select_strategy="cls"),
            "vision_feature_select_strategy",
        ),
        (lambda r: r.update(image_token=""), "image_token"),
        (lambda r: r.update(processor_class="LlavaNextProcessor"), "does not go with"),
        (lambda r: r.update(image_processor=CLIP), "found both"),
    ],
    ids=["unknown", "missing-extra", "missing-patch", "strategy", "token", "pairing", "both"],
)
def test_processor_settings_are_strict(mutate, fragment):
    raw = dict(PROCESSOR)
    mutate(raw)
    with pytest.raises(MllamaExportError, match=fragment):
        lp.LlavaProcessorConfig.from_dict(raw, CLIP)


def test_processor_must_match_the_model():
    config = lp.LlavaProcessorConfig.from_dict(PROCESSOR, CLIP)
    config.check_against(llava_preset("llava-1.5-7b"))
    with pytest.raises(MllamaExportError, match="tiles of .* for a 56-pixel tower"):
        config.check_against(llava_preset("llava-tiny"))
    with pytest.raises(MllamaExportError, match="the processor is for llava, the model llava_next"):
        config.check_against(llava_preset("llava-next-mistral-7b"))
    with pytest.raises(MllamaExportError, match="num_additional_image_tokens 0"):
        lp.LlavaProcessorConfig.from_dict(
            {**PROCESSOR, "num_additional_image_tokens": 0}, CLIP
        ).check_against(llava_preset("llava-1.5-7b"))


def test_missing_processor_file(tmp_path: Path):
    with pytest.raises(MllamaExportError, match="processor_config.json"):
        lp.LlavaProcessorConfig.from_dir(tmp_path)


@pytest.mark.parametrize("name", ["llava-tiny", "llava-next-tiny"])
def test_synthetic_checkpoint_files_load_in_transformers(name, tmp_path):
    """The synthetic writer's tokenizer, chat template and processor files, as transformers
    reads them, give the same prompt ids and pixels as ours."""
    from mllama_export.graphs.synthetic import write_checkpoint

    model = llava_preset(name)
    folder = write_checkpoint(model, tmp_path)
    proc = transformers.AutoProcessor.from_pretrained(folder)
    config, tokenizer = lp.LlavaProcessorConfig.from_dir(folder), Tokenizer.from_dir(folder)
    config.check_against(model)
    assert proc.image_token_id == model.image_token_id == tokenizer.token_id("<image>")
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(37, 91), (120, 50)]
    ]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}],
        },
    ]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == text
    ref = proc(images=images, text=[text])
    got = lp.preprocess_llava([images], config.image)
    assert encode_llava_prompt(tokenizer, text, got.image_sizes[0], config) == list(
        ref["input_ids"][0]
    )
    assert_same_pixels(got, ref, model.model_type)
    assert tokenizer.decode(ref["input_ids"][0][-5:], skip_special_tokens=False) == proc.decode(
        ref["input_ids"][0][-5:]
    )
