"""LLaVA prompts without transformers: the image-token expansion of LlavaProcessor and
LlavaNextProcessor, token ids for prompts, and a left-padded batch for the graphs.

The tokenizer and chat template are the checkpoint's own, read by engines/text.py's Tokenizer.
Token ids given as they are (`run --token-ids`) are checked against the images by
graphs/llava_layout.py's `check_image_tokens`, which the layout builder runs too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.llava_layout import ImageSize, select_best_resolution, unpadded_region

from .llava_preprocess import LlavaProcessorConfig
from .text import Tokenizer


def processor_token_count(proc: LlavaProcessorConfig, size: ImageSize) -> int:
    """How many image tokens the processor puts in place of one `<image>`: LlavaProcessor's
    `replace_image_token`, or LlavaNextProcessor's `_get_number_of_features`."""
    tile = proc.image.tile
    if tile is None:
        raise MllamaExportError(
            "the image processor resizes by shortest edge without a center crop, so its tiles "
            "are not of one size; expected do_center_crop=true or a size with height and width"
        )
    p = proc.patch_size
    ph, pw = tile[0] // p, tile[1] // p
    count = ph * pw + proc.num_additional_image_tokens
    if proc.image.kind == "llava_next":
        best_h, best_w = select_best_resolution(*size, proc.image.image_grid_pinpoints)
        height, width = ph * (best_h // tile[0]), pw * (best_w // tile[1])
        top, bottom, left, right = unpadded_region(size, height, width)
        count += (bottom - top) * (right - left) + (bottom - top)
    return count - (proc.vision_feature_select_strategy == "default")


def expand_image_tokens(
    text: str, image_sizes: Sequence[ImageSize], proc: LlavaProcessorConfig
) -> str:
    """Each `<image>` of the text, in order, repeated as many times as its image has tokens."""
    parts = text.split(proc.image_token)
    if len(parts) - 1 != len(image_sizes):
        raise MllamaExportError(
            f"the prompt has {len(parts) - 1} {proc.image_token} placeholders but "
            f"{len(image_sizes)} images were given; expected one image per placeholder"
        )
    pieces = [parts[0]]
    for size, part in zip(image_sizes, parts[1:], strict=True):
        pieces += [proc.image_token * processor_token_count(proc, size), part]
    return "".join(pieces)


def encode_llava_prompt(
    tokenizer: Tokenizer,
    text: str,
    image_sizes: Sequence[ImageSize],
    proc: LlavaProcessorConfig,
    add_special_tokens: bool = True,
) -> list[int]:
    """Token ids exactly as `processor(text=text, images=...)` gives them for one prompt (BOS
    from the tokenizer's post-processor; a rendered chat template is passed as text)."""
    if tokenizer.token_id(proc.image_token) is None:
        raise MllamaExportError(
            f"the tokenizer has no {proc.image_token!r} token, which processor_config.json names "
            "as the image token; expected the checkpoint's own tokenizer"
        )
    expanded = expand_image_tokens(text, image_sizes, proc)
    return tokenizer.backend.encode(expanded, add_special_tokens=add_special_tokens).ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Left-padded int64 input_ids, attention_mask and position_ids (as transformers' generate
    numbers them: 0 at the first real token, pads at 0)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise MllamaExportError(
            f"got {len(rows)} prompts, some empty; expected at least one token per prompt"
        )
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, longest - len(row) :] = row
        mask[b, longest - len(row) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
