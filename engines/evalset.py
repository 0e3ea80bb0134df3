"""The evaluation set the accuracy gate runs and the FP8 build calibrates on: fixed and
deterministic, or a user's own.

``build_evalset(config)`` derives a small set of cases from the model config alone (token ids
from its vocabulary, random image tiles from seeded numpy), so the same artifacts are always
judged on the same inputs. Together the cases cover: prompts of several lengths, a text-only
prompt, an image of every supported aspect ratio (hence every tile count), text before the
image (where the ``meta`` and ``hf`` cross-attention masks differ), two images in one prompt,
consecutive images, and batches of prompts of different lengths (left padding).

``load_evalset(folder, artifacts)`` reads a user's ``prompts.jsonl``::

    {"prompt": "Describe the image.", "images": ["cat.png"]}
    {"token_ids": [128000, 128256, 791, 2217], "images": ["dog.jpg"], "name": "dog"}
    {"prompt": "A text-only prompt."}

one JSON object per line (blank lines and lines starting with ``#`` are skipped): exactly one
of ``prompt`` (text, tokenized with the artifact folder's tokenizer; a prompt with images but
no ``<|image|>`` gets the image tokens in front, as ``mllama-export run`` does) and
``token_ids`` (one ``<|image|>`` id per image); ``images`` (optional) are files beside
``prompts.jsonl`` (or absolute paths), preprocessed with the artifact folder's
``preprocessor_config.json``; ``name`` (optional) names the case in the report.

This module is Mllama's "evalset" part. What generic code (the gate, sensitivity, the CLI,
FP8 calibration) calls, and another family's evaluation set offers too:
``build_evalset(config, limits, steps)``, ``load_evalset(folder, artifacts)``, cases with
``.name`` and ``.prompts`` (token ids per row) and ``.images`` (passed to the runner as they
are), ``case_stages(case)`` (the stages judged before prefill: Mllama's ``vision`` for a case
with images) and ``traced_stages(case, config, first)`` (those stages' values from the first
outputs of each graph a runner ran, ``first``: graph name -> outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.limits import Limits

from .inputs import InputProcessor
from .preprocess import PreprocessedImages
from .userprompts import EVALSET_FILE, read_prompts

__all__ = [
    "EvalCase",
    "build_evalset",
    "load_evalset",
    "read_cases",
    "EVALSET_FILE",
    "case_stages",
    "traced_stages",
    "real_tiles",
]

_IDS = '"token_ids"'  # how errors name a line's token ids


@dataclass(eq=False)
class EvalCase:
    """One batch the gate runs through vision, prefill and the decode steps."""

    name: str
    prompts: list[list[int]]  # token ids per row, unpadded
    images: PreprocessedImages | None = None  # one row per prompt; None: text only

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else sum(len(t) for t in self.images.num_tiles)


# -- what the gate judges before prefill ------------------------------------------------------


def case_stages(case: EvalCase) -> tuple[str, ...]:
    """The stages of `case` judged before prefill: the vision graph's, when it has images."""
    return ("vision",) if case.images is not None else ()


def traced_stages(case: EvalCase, config: MllamaConfig, first: dict) -> dict[str, np.ndarray]:
    """The vision stage of a run: the cross-attention K/V of the real tiles of the real
    images (padding tiles and images are computed but never attended, so they are left
    out), from the vision graph's outputs; nothing when it did not run."""
    out = first.get("vision")
    if out is None:
        return {}
    return {"vision": real_tiles(out["cross_key"], out["cross_value"], case, config)}


def real_tiles(key: np.ndarray, value: np.ndarray, case: EvalCase, config) -> np.ndarray:
    # key, value: [L_x, B, H_kv, I*T*P, Dh] -> [real tiles, 2, L_x, H_kv, P, Dh]
    layers, b, heads, _, dim = key.shape
    tiles, patches = config.vision.max_num_tiles, config.vision.num_patches
    kv = np.stack([key, value]).reshape(2, layers, b, heads, -1, tiles, patches, dim)
    kv = kv.transpose(2, 4, 5, 0, 1, 3, 6, 7)  # [B, I, T, 2, L_x, H_kv, P, Dh]
    real = np.zeros(kv.shape[:3], bool)
    for row, counts in enumerate(case.images.num_tiles):
        for i, n in enumerate(counts):
            real[row, i, :n] = True
    return kv[real]


# -- the fixed evaluation set ----------------------------------------------------------------


def build_evalset(
    config: MllamaConfig, limits: Limits | None = None, steps: int = 8, seed: int = 0
) -> list[EvalCase]:
    """The fixed evaluation set for ``config``, fitted to the artifacts' ``limits``.

    Prompt lengths are clipped so that prompt plus ``steps + 1`` tokens fit ``max_seq_len``;
    batches are at most ``max_batch`` rows; prompts with more images than ``max_images`` are
    split. Every aspect ratio is still covered whatever the limits.
    """
    limits = limits or Limits(max_batch=4, max_seq_len=512, max_images=2)
    longest = limits.max_seq_len - (steps + 1)
    if longest < 4:
        raise MllamaExportError(
            f"the artifacts were built for {limits.max_seq_len} tokens in all; the evaluation "
            f"set needs prompts of at least 4 tokens plus {steps + 1} generated ones "
            f"(use fewer --steps, at most {max(limits.max_seq_len - 5, 0)})"
        )
    maker = _CaseMaker(config, seed, longest)
    ratios = list(range(1, config.vision.max_aspect_ratio_id + 1))
    tiles = {r: _tiles(config, r) for r in ratios}
    one_tile = min(ratios, key=lambda r: (tiles[r], r))
    most_tiles = max(ratios, key=lambda r: (tiles[r], -r))
    rest = [r for r in ratios if r not in (one_tile, most_tiles)]

    cases = [
        maker.case("text-only", [(8, [])]),
        maker.case("image-first", [(12, [(1, one_tile)])]),
        # Text before the image: the rows where the meta and hf masks differ.
        maker.case("text-then-image", [(40, [(4, most_tiles)])]),
    ]
    pairs, singles = (rest[:2], rest[2:]) if limits.max_images >= 2 else ([], rest)
    if len(pairs) == 2:
        cases.append(maker.case("two-images", [(16, [(1, pairs[0]), (6, pairs[1])])]))
    else:
        singles = pairs + singles
    lengths = (6, 11, 17, 29, 9, 23, 14, 35)
    for n, start in enumerate(range(0, len(singles), limits.max_batch)):
        chunk = singles[start : start + limits.max_batch]
        rows = [(lengths[(start + i) % len(lengths)], [(1, r)]) for i, r in enumerate(chunk)]
        cases.append(maker.case(f"batch-{len(chunk)}" + (f"-{n}" if n else ""), rows))
    if limits.max_batch >= 2 and limits.max_images >= 2:
        # A padded batch mixing a text-only row with two consecutive images (which share the
        # text after them): padding images and rows that see no image in one batch.
        cases.append(maker.case("batch-mixed", [(5, []), (14, [(1, one_tile), (2, most_tiles)])]))
    return cases


def _tiles(config: MllamaConfig, ratio_id: int) -> int:
    h, w = config.vision.supported_aspect_ratios[ratio_id - 1]
    return h * w


class _CaseMaker:
    """Prompts from the config's vocabulary, random tiles from seeded numpy; one seed per case."""

    def __init__(self, config: MllamaConfig, seed: int, longest: int):
        t = config.text
        self.config, self.seed, self.longest = config, seed, longest
        self.count = 0
        special = {t.bos_token_id, *t.eos_token_ids, config.image_token_id}
        if t.pad_token_id is not None:
            special.add(t.pad_token_id)
        # Regular text tokens: below the special ones where these sit at the top of the
        # vocabulary (as in Llama 3), else the whole vocabulary minus the special ids.
        low = min(special)
        self.high = low if low >= t.vocab_size // 2 else t.vocab_size
        self.special = special

    def case(self, name: str, rows: list[tuple[int, list[tuple[int, int]]]]) -> EvalCase:
        """rows: (prompt length, [(position of an <|image|> token, aspect ratio id), ...])."""
        rng = np.random.default_rng([self.seed, self.count])
        self.count += 1
        prompts = [self._prompt(rng, length, [p for p, _ in imgs]) for length, imgs in rows]
        ratios = [[r for _, r in imgs] for _, imgs in rows]
        images = self._images(rng, ratios) if any(ratios) else None
        return EvalCase(name, prompts, images)

    def _prompt(self, rng: np.random.Generator, length: int, at: list[int]) -> list[int]:
        length = max(min(length, self.longest), max(at, default=0) + 2)
        ids = rng.integers(0, self.high, size=length)
        while bad := [i for i, tok in enumerate(ids) if int(tok) in self.special]:
            ids[bad] = rng.integers(0, self.high, size=len(bad))
        prompt = [self.config.text.bos_token_id, *map(int, ids[1:])]
        for pos in at:
            prompt[pos] = self.config.image_token_id
        return prompt

    def _images(self, rng: np.random.Generator, ratios: list[list[int]]) -> PreprocessedImages:
        """Tiles of random normalized pixels, in the processor's layout (padding included)."""
        v = self.config.vision
        b, n = len(ratios), max(len(r) for r in ratios)
        pixels = np.zeros(
            (b, n, v.max_num_tiles, v.num_channels, v.image_size, v.image_size), np.float32
        )
        ids = np.zeros((b, n), np.int64)
        mask = np.zeros((b, n, v.max_num_tiles), np.int64)
        mask[:, :, 0] = 1  # the processor marks tile 0 of padding images valid too
        tiles: list[list[int]] = []
        for row, row_ratios in enumerate(ratios):
            tiles.append([])
            for i, ratio_id in enumerate(row_ratios):
                t = _tiles(self.config, ratio_id)
                pixels[row, i, :t] = rng.standard_normal((t, *pixels.shape[3:]), np.float32)
                ids[row, i], mask[row, i, :t] = ratio_id, 1
                tiles[-1].append(t)
        return PreprocessedImages(pixels, ids, mask, tiles)


# -- a user's evaluation set -----------------------------------------------------------------


def load_evalset(folder: str | Path, artifacts: str | Path) -> list[EvalCase]:
    """The cases of ``folder/prompts.jsonl``, one single-prompt case per line.

    Text is tokenized with the tokenizer of the artifact folder and images are preprocessed
    with its ``preprocessor_config.json``; every malformed line is an error naming the line.
    """
    from .manifest_read import read_manifest

    config = MllamaConfig.from_hf_dict(read_manifest(artifacts)["model"]["config"])
    return read_cases(folder, config, artifacts)


def read_cases(folder: str | Path, config: MllamaConfig, resources: str | Path) -> list[EvalCase]:
    """:func:`load_evalset` for a model ``config``, with the tokenizer and the preprocessor
    config taken from ``resources`` (an artifact or checkpoint folder)."""
    reader = _UserCases(Path(resources), config)
    return read_prompts(folder, lambda: reader.case, as_object=_entry_object)


class _UserCases:
    def __init__(self, artifacts: Path, config: MllamaConfig):
        self.artifacts, self.config = artifacts, config
        self._inputs: InputProcessor | None = None

    @property
    def inputs(self) -> InputProcessor:
        if self._inputs is None:  # the folder's tokenizer and image config, read once
            self._inputs = InputProcessor.from_folder(self.artifacts, self.config)
        return self._inputs

    def case(self, where: str, n: int, entry: dict, images: list[Path]) -> EvalCase:
        if entry["prompt"] is not None and self.inputs.tokenizer is None:
            raise MllamaExportError(
                f"{where}: a text prompt needs a tokenizer, and {self.artifacts} has no "
                'tokenizer.json; give "token_ids" instead'
            )
        if images and self.inputs.image_config is None:
            path = self.artifacts / "preprocessor_config.json"
            raise MllamaExportError(
                f"{where}: images need {path.name}, which {self.artifacts} lacks"
            )
        try:
            # The same ids `mllama-export run` and transformers' processor give this prompt.
            ids, batch = self.inputs.encode(
                entry["prompt"], images, token_ids=entry["token_ids"], ids_name=_IDS
            )
        except MllamaExportError as err:
            raise MllamaExportError(f"{where}: {err}") from err
        return EvalCase(entry["name"] or f"line-{n}", [ids], batch)


def _entry_object(where: str, entry: object) -> dict:
    if not isinstance(entry, dict):
        raise MllamaExportError(
            f'{where}: expected a JSON object such as {{"prompt": "..."}}, got '
            f"{type(entry).__name__}"
        )
    return entry
