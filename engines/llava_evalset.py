"""LLaVA's "evalset" part: the evaluation set the gate runs (and FP8 calibrates on), fixed and
deterministic, or a user's own.

``build_evalset(config, limits, steps)`` derives the cases from the config alone (token ids
from its vocabulary, image tokens expanded as the processor expands them, random normalized
tiles from seeded numpy): a text-only prompt, one image, two images in one prompt, a padded
batch of three rows (one without an image, one with two), and for LLaVA-NeXT one image whose
best resolution is each of the config's pinpoints (so every grid and unpadding is judged).

``load_evalset(folder, artifacts)`` reads a user's ``prompts.jsonl``, as Mllama's does
(engines/evalset.py): one JSON object per line, exactly one of ``prompt`` (text, tokenized
with the artifact folder's tokenizer; images without ``<image>`` get one each in front) and
``token_ids`` (each image's tokens already expanded); ``images`` (optional) are files beside
it, preprocessed with the folder's processor config; ``name`` names the case.

The API is engines/evalset.py's: cases with ``.name``, ``.prompts`` and ``.images`` (passed to
the runner as they are), ``case_stages(case)`` and ``traced_stages(case, config, first)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_layout import (
    ImageSize,
    image_tiles,
    image_token_count,
    select_best_resolution,
)

from .llava_inputs import LlavaInputProcessor
from .llava_preprocess import LlavaImages
from .store import to_numpy
from .userprompts import read_prompts


@dataclass(eq=False)
class EvalCase:
    """One batch the gate runs through vision, prefill and the decode steps."""

    name: str
    prompts: list[list[int]]  # token ids per row, image tokens expanded, unpadded
    images: LlavaImages | None = None  # the batch's tiles and each row's image sizes

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else sum(len(r) for r in self.images.image_sizes)


# -- what the gate judges before prefill ------------------------------------------------------


def case_stages(case: EvalCase) -> tuple[str, ...]:
    """The vision graph's stage, when the case has an image."""
    return ("vision",) if case.num_images else ()


def traced_stages(case: EvalCase, config: LlavaConfig, first: dict) -> dict[str, np.ndarray]:
    """The projected features of every tile (all real: LLaVA pads no tile), from the vision
    graph's first outputs; nothing when it did not run."""
    out = first.get("vision")
    if out is None:
        return {}
    features = out["image_features"]
    return {"vision": features if isinstance(features, np.ndarray) else to_numpy(features)}


# -- the fixed evaluation set ----------------------------------------------------------------

# (text run lengths around the images, which of the case's image sizes) per row
_ROWS = {
    "text-only": [((9,), ())],
    "one-image": [((3, 6), (0,))],
    "two-images": [((2, 4, 3), (0, 1))],
    "padded-batch-of-3": [((3, 1), (1,)), ((7,), ()), ((1, 2, 4), (0, 2))],
}


def build_evalset(
    config: LlavaConfig, limits: Limits | None = None, steps: int = 8, seed: int = 0
) -> list[EvalCase]:
    """The fixed evaluation set for ``config``, fitted to the artifacts' ``limits``: rows of
    more images than max_images lose their last images, batches are cut to max_batch rows,
    and prompt plus ``steps + 1`` tokens fit max_seq_len (cases that cannot are left out,
    but never every case with an image while the artifacts take images)."""
    limits = limits or Limits(max_batch=4, max_seq_len=512, max_images=2)
    room = limits.max_seq_len - (steps + 1)
    if room < 4:
        raise MllamaExportError(
            f"the artifacts were built for {limits.max_seq_len} tokens in all; the evaluation "
            f"set needs prompts of at least 4 tokens plus {steps + 1} generated ones "
            f"(use fewer --steps, at most {max(limits.max_seq_len - 5, 0)})"
        )
    maker = _CaseMaker(config, seed, limits)
    sizes = _image_sizes(config)
    cases = [maker.case(name, rows, sizes) for name, rows in _ROWS.items()]
    if config.is_next:
        for size in _pinpoint_images(config):
            h, w = select_best_resolution(*size, config.image_grid_pinpoints)
            cases.append(maker.case(f"pinpoint-{h}x{w}", [((2, 3), (0,))], [size]))
    kept = [c for c in cases if c is not None and max(map(len, c.prompts)) <= room]
    if limits.max_images and not any(c.num_images for c in kept):
        need = min(image_token_count(config, s) for s in sizes) + 4 + steps + 1
        raise MllamaExportError(
            f"the artifacts take images but were built for {limits.max_seq_len} tokens in all; "
            f"an image of this model takes at least {need - 5 - steps} tokens, so the "
            f"evaluation set's image cases need max_seq_len {need} or more (or fewer --steps)"
        )
    return kept


def _image_sizes(config: LlavaConfig) -> list[ImageSize]:
    """(height, width) of a landscape, a portrait and a small image, in tiles' terms."""
    t = config.vision.image_size
    return [(t * 3 // 4, t * 5 // 3), (t * 2, t * 5 // 6), (max(1, t // 3), max(1, t // 2))]


def _pinpoint_images(config: LlavaConfig) -> list[ImageSize]:
    """One image size per pinpoint whose best resolution it is, a little off its aspect
    ratio where that still picks it (so that the unpadding trims rows or columns)."""
    pins = config.image_grid_pinpoints
    found = []
    for ph, pw in dict.fromkeys(pins):
        for size in ((ph * 9 // 10, pw), (ph, pw * 9 // 10), (ph, pw)):
            if min(size) > 0 and select_best_resolution(*size, pins) == (ph, pw):
                found.append(size)
                break
    return found


class _CaseMaker:
    """Prompts from the config's vocabulary, random tiles from seeded numpy; one seed per case."""

    def __init__(self, config: LlavaConfig, seed: int, limits: Limits):
        t = config.text
        self.config, self.seed, self.limits, self.count = config, seed, limits, 0
        special = {t.bos_token_id, *t.eos_token_ids, config.image_token_id}
        special |= {config.pad_token_id, t.pad_token_id}
        self.special = {i for i in special if i is not None}
        # regular text: below the image token where it sits at the top (as in llava-hf's)
        image = config.image_token_id
        self.high = image if t.vocab_size // 2 <= image < t.vocab_size else t.vocab_size

    def case(self, name: str, rows, sizes: list[ImageSize]) -> EvalCase | None:
        rows = rows[: self.limits.max_batch]
        rng = np.random.default_rng([self.seed, self.count])
        self.count += 1
        row_sizes = [[sizes[i] for i in which][: self.limits.max_images] for _, which in rows]
        prompts = [
            self._prompt(rng, lengths, chosen)
            for (lengths, _), chosen in zip(rows, row_sizes, strict=True)
        ]
        if not any(row_sizes):
            return EvalCase(name, prompts)
        if not self.limits.max_images:
            return None  # artifacts without images: an image case is not theirs to judge
        v = self.config.vision
        n = sum(image_tiles(self.config, s) for row in row_sizes for s in row)
        pixels = rng.standard_normal((n, v.num_channels, v.image_size, v.image_size), np.float32)
        tiles = [[image_tiles(self.config, s) for s in row] for row in row_sizes]
        return EvalCase(name, prompts, LlavaImages(pixels, row_sizes, tiles))

    def _text(self, rng: np.random.Generator, n: int) -> list[int]:
        ids = rng.integers(0, self.high, size=n)
        while bad := [i for i, tok in enumerate(ids) if int(tok) in self.special]:
            ids[bad] = rng.integers(0, self.high, size=len(bad))
        return [int(i) for i in ids]

    def _prompt(self, rng, lengths: tuple[int, ...], sizes: list[ImageSize]) -> list[int]:
        bos = self.config.text.bos_token_id
        ids = ([] if bos is None else [bos]) + self._text(rng, lengths[0])
        for size, n in zip(sizes, lengths[1:], strict=False):
            ids += [self.config.image_token_id] * image_token_count(self.config, size)
            ids += self._text(rng, n)
        return ids


# -- a user's evaluation set -----------------------------------------------------------------


def load_evalset(folder: str | Path, artifacts: str | Path) -> list[EvalCase]:
    """The cases of ``folder/prompts.jsonl``, one single-prompt case per line, tokenized and
    preprocessed with the artifact folder's tokenizer and processor config."""
    from .manifest_read import read_manifest

    config = LlavaConfig.from_hf_dict(read_manifest(artifacts)["model"]["config"])
    return read_cases(folder, config, artifacts)


def read_cases(folder: str | Path, config: LlavaConfig, resources: str | Path) -> list[EvalCase]:
    """:func:`load_evalset` for a model ``config``, the tokenizer and processor config taken
    from ``resources`` (an artifact or checkpoint folder)."""

    def start():
        return partial(_user_case, LlavaInputProcessor.from_folder(resources, config))

    return read_prompts(folder, start)


def _user_case(
    inputs: LlavaInputProcessor, where: str, n: int, values: dict, paths: list[Path]
) -> EvalCase:
    try:
        ids, images = inputs.encode(
            values["prompt"], paths, token_ids=values["token_ids"], ids_name='"token_ids"'
        )
    except MllamaExportError as err:
        raise MllamaExportError(f"{where}: {err}") from None
    return EvalCase(values["name"] or f"line-{n}", [ids], images)
