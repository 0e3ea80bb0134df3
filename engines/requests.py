"""Checks of a request that every family's input processor makes the same way: what counts as
one image or a list of them, token ids that must be integer rows of the embedding, a prompt's
type and text, the tokenizer a prompt needs, and the artifacts' max_images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mllama_export.errors import MllamaExportError

from .images import ImageSource

if TYPE_CHECKING:
    from .text import Tokenizer


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


def given_ids(token_ids: object, ids_name: str) -> list:
    """Token ids as a user gave them (``ids_name`` names them in errors), as a list."""
    if not isinstance(token_ids, list | tuple | np.ndarray):
        raise MllamaExportError(
            f"{ids_name} is {type(token_ids).__name__} {token_ids!r:.60}; expected a list "
            "of token ids"
        )
    return list(token_ids)


def check_prompt_text(prompt: str, images: Sequence) -> None:
    """An empty or blank prompt only with an image."""
    if not prompt.strip() and not images:
        raise MllamaExportError(
            f"the prompt is {'empty' if not prompt else 'only whitespace'} and no image was "
            "given; expected some text, or an image with an empty prompt"
        )


def prompt_type_error(prompt: object) -> MllamaExportError:
    return MllamaExportError(
        f"prompt is a {type(prompt).__name__}; expected a string or a list of chat "
        "messages ({'role': ..., 'content': ...} dicts)"
    )


def need_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise MllamaExportError(
            "these artifacts have no tokenizer.json; pass token ids (generate_ids, --token-ids)"
        )
    return tokenizer


def check_max_images(limits, images: int) -> None:
    """At most the artifacts' max_images (``limits``: None, not checked here)."""
    if limits is not None and images > limits.max_images:
        raise MllamaExportError(
            f"{images} images were given but these artifacts were built for at most "
            f"{limits.max_images} per prompt (max_images); give fewer images or "
            "rebuild with a larger max_images"
        )
