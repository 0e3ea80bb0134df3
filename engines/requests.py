"""Checks of a request that every family's input processor makes the same way: what counts as
one image or a list of them, and token ids that must be integer rows of the embedding."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mllama_export.errors import MllamaExportError

from .images import ImageSource


def as_image_list(images: Sequence[ImageSource] | ImageSource | None) -> list[ImageSource]:
    # One path, bytes or PIL image is one image, not a sequence of characters or bytes.
    if images is None:
        return []
    if isinstance(images, str | os.PathLike | bytes | bytearray | memoryview | Image.Image):
        return [images]
    if not isinstance(images, Sequence):
        raise MllamaExportError(
            f"images is {type(images).__name__} {images!r:.60}; expected a file path, bytes, a "
            "PIL.Image.Image, or a list of them"
        )
    return list(images)


def is_token(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_ids(ids: Sequence, rows: int, subject: str) -> None:
    """Every id an integer row of the embedding; subject says whose ("prompt 0 holds")."""
    bad = [t for t in ids if not is_token(t)]
    if bad:
        raise MllamaExportError(
            f"{subject} {bad[0]!r} ({type(bad[0]).__name__}); expected integer token ids"
        )
    outside = [int(t) for t in ids if not 0 <= t < rows]
    if outside:
        raise MllamaExportError(
            f"{subject} token id(s) {outside[:5]} outside the vocabulary; expected ids in "
            f"0..{rows - 1}"
        )


def check_rows(prompts: object) -> None:
    """A batch of prompts: a list of token-id lists."""
    rows_ok = isinstance(prompts, list | tuple | np.ndarray) and all(
        isinstance(p, list | tuple | np.ndarray) for p in prompts
    )
    if not rows_ok:
        raise MllamaExportError(
            f"prompts is {type(prompts).__name__} {prompts!r:.60}; expected a list of token-id "
            "lists, one per prompt, e.g. [[500, 512, 12]]"
        )
