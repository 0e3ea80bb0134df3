"""What a user holds (a prompt, chat messages or token ids, and images) -> the graphs' inputs.

The runner, `mllama-export run` and a user's evaluation set all go through `InputProcessor`,
and every check of a request lives in this file: the prompt's type, the token ids' range, one
image per `<|image|>` token, max_images (`InputProcessor.encode`); batch size, sequence length
and the image batch of a token-id request (`check_request`); the cross-attention mask's
image-token / tile counts (`cross_attention_mask_from_ids`). `prompt_feed` turns a batch of
token ids and images into the text graphs' feed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig

from .preprocess import ImageProcessorConfig, ImageSource, PreprocessedImages, preprocess
from .profiles import HasLimits
from .requests import (
    as_image_list,
    check_ids,
    check_max_images,
    check_prompt_text,
    check_rows,
    given_ids,
    need_tokenizer,
    prompt_type_error,
)
from .steps import logit_positions
from .text import IMAGE_TOKEN, Prompt, Tokenizer


class Encoded(NamedTuple):
    ids: list[int]  # one prompt's token ids, unpadded
    images: PreprocessedImages | None  # one row; None: no image


def folder_resources(folder: str | Path) -> tuple[Tokenizer | None, ImageProcessorConfig | None]:
    """The tokenizer and image preprocessing of an artifact or checkpoint folder, where it
    has them (a folder without tokenizer.json still runs token ids)."""
    folder = Path(folder)
    tokenizer = Tokenizer.from_dir(folder) if (folder / "tokenizer.json").is_file() else None
    path = folder / "preprocessor_config.json"
    return tokenizer, ImageProcessorConfig.from_file(path) if path.is_file() else None


@dataclass(frozen=True)
class InputProcessor:
    """Prompts, chat messages or token ids and images -> token ids and preprocessed images,
    exactly as transformers' MllamaProcessor makes them, refused with one clear error when
    they do not fit the model or the artifacts.

    Mllama's "inputs" part. What generic code (the runner, the artifact loader, `run`)
    calls, and another family's processor offers too: `for_config(config, limits,
    tokenizer, image_config)`, `from_folder(folder, config, limits)` (the folder's
    tokenizer.json and image preprocessing, where present), `.tokenizer`, `.image_config`,
    `encode(prompt, images) -> (token ids, the images as the graphs take them or None)`
    (or `encode(images=..., token_ids=..., ids_name=..., images_name=...)` for ids as given,
    the names for messages),
    `need_tokenizer()` and `check_request(prompts, images, max_new_tokens)`."""

    image_token_id: int
    vocab_rows: int  # valid ids are 0..vocab_rows - 1 (rows of the embedding)
    limits: HasLimits | None = None  # None: max_images is not checked here
    tokenizer: Tokenizer | None = None
    image_config: ImageProcessorConfig | None = None

    @classmethod
    def for_config(
        cls,
        config: MllamaConfig,
        limits: HasLimits | None = None,
        tokenizer: Tokenizer | None = None,
        image_config: ImageProcessorConfig | None = None,
    ) -> InputProcessor:
        rows = config.text.embedding_rows
        return cls(config.image_token_id, rows, limits, tokenizer, image_config)

    @classmethod
    def from_folder(
        cls, folder: str | Path, config: MllamaConfig, limits: HasLimits | None = None
    ) -> InputProcessor:
        return cls.for_config(config, limits, *folder_resources(folder))

    def encode(
        self,
        prompt: Prompt | None = None,
        images: Sequence[ImageSource] | ImageSource | None = (),
        *,
        token_ids: Sequence[int] | None = None,
        ids_name: str = "the token ids",
        images_name: str = "image(s)",
    ) -> Encoded:
        """A plain string is what `processor(images=images, text=prompt)` gives, quirks
        included: the processor puts BOS text after any leading `<|image|>` tokens and its
        tokenizer then adds another BOS, so "hi" -> [BOS, BOS, hi] and "<|image|>hi" ->
        [BOS, IMG, BOS, hi]; image tokens elsewhere in the text stay where they are. One
        convenience beyond the processor (which refuses it): a string with no `<|image|>` at
        all but with images gets one `<|image|>` per image in front.

        Chat messages ({"role", "content"} dicts whose content is a string or a list of
        {"type": "text", "text": ...} and {"type": "image"} parts) give the ids of
        `processor.apply_chat_template(messages, add_generation_prompt=True)`, then
        `processor(images=images, text=rendered, add_special_tokens=False)` (one BOS).

        token_ids are used as given. ids_name and images_name name them in errors (the CLI
        says "--token-ids" and "--image"). The `<|image|>` tokens must be one per image, in
        order, and the images at most the artifacts' max_images."""
        images = as_image_list(images)
        if prompt is not None and token_ids is not None:
            raise MllamaExportError("give exactly one of a prompt and token ids, not both")
        if token_ids is not None:
            ids = given_ids(token_ids, ids_name)
            check_ids(ids, self.vocab_rows, f"{ids_name} hold")
            self._check_id_images(
                ids.count(self.image_token_id), len(images), ids_name, images_name
            )
        else:
            ids = self._encode_text(prompt, images)
        if not images:
            return Encoded(ids, None)
        if self.image_config is None:
            raise MllamaExportError(
                "these artifacts have no preprocessor_config.json; images cannot be read"
            )
        return Encoded(ids, preprocess([images], self.image_config))

    def _encode_text(self, prompt: Prompt, images: list[ImageSource]) -> list[int]:
        tok = self.need_tokenizer()
        if isinstance(prompt, str):
            check_prompt_text(prompt, images)
            text, add_special_tokens, what = with_image_tokens(prompt, len(images)), True, None
        elif isinstance(prompt, list | tuple):
            text = tok.apply_chat_template(prompt, add_generation_prompt=True)
            add_special_tokens, what = False, "the chat messages"
        else:
            raise prompt_type_error(prompt)
        self._check_text_images(text.count(IMAGE_TOKEN), len(images), what)
        return tok.processor_encode(text, add_special_tokens=add_special_tokens)

    def check_request(
        self, prompts: object, images: PreprocessedImages | None, max_new_tokens: int
    ) -> None:
        """A batch of token-id prompts and its images, before any graph runs (the runner's
        call: `check_request` below, against this processor's vocabulary and limits)."""
        check_request(self.vocab_rows, self.limits, prompts, images, max_new_tokens)

    def need_tokenizer(self) -> Tokenizer:
        return need_tokenizer(self.tokenizer)

    def _check_text_images(self, tokens: int, images: int, chat: str | None) -> None:
        """chat: "the chat messages", whose image tokens come from image parts; None: text."""
        if tokens != images:
            raise MllamaExportError(
                f"{chat or 'the prompt'} hold{'' if chat else 's'} {tokens} {IMAGE_TOKEN} token"
                f"{'s' * (tokens != 1)}{' (one per image part)' if chat else ''} but {images} "
                f"image{'s' * (images != 1)} {'was' if images == 1 else 'were'} given; give "
                f"one image per {'image part' if chat else IMAGE_TOKEN + ' token'}"
            )
        check_max_images(self.limits, images)

    def _check_id_images(self, tokens: int, images: int, ids_name: str, images_name: str) -> None:
        if tokens != images:
            image_id = self.image_token_id
            raise MllamaExportError(
                f"{ids_name} hold {tokens} {IMAGE_TOKEN} token(s) (id {image_id}) but {images} "
                f"{images_name} were given; expected one {image_id} per image, in order"
            )
        check_max_images(self.limits, images)


def with_image_tokens(prompt: str, num_images: int) -> str:
    """A plain prompt given images but no <|image|> gets one per image in front, where the
    model card's examples put them (the reference processor would refuse it instead)."""
    if num_images and IMAGE_TOKEN not in prompt:
        return IMAGE_TOKEN * num_images + prompt
    return prompt


# -- a batch of token ids --------------------------------------------------------------------


def check_request(
    vocab_rows: int,
    limits: HasLimits,
    prompts: object,
    images: PreprocessedImages | None,
    max_new_tokens: int,
) -> None:
    """A batch of token-id prompts and its preprocessed images, against the artifacts'
    limits, before any graph runs."""
    check_rows(prompts)
    for i, prompt in enumerate(prompts):
        check_ids(prompt, vocab_rows, f"prompt {i} holds")
    problems = _request_problems(limits, prompts, images, max_new_tokens)
    if problems:
        raise MllamaExportError("cannot generate: " + "; ".join(problems))


def _request_problems(limits, prompts, images, max_new_tokens: int) -> list[str]:
    problems = []
    if not prompts or len(prompts) > limits.max_batch:
        problems.append(f"a batch of {len(prompts)} prompts (built for 1..{limits.max_batch})")
    if any(len(p) == 0 for p in prompts):
        problems.append("an empty prompt (at least one token is needed)")
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens {max_new_tokens} (must be at least 1)")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > limits.max_seq_len:
        problems.append(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens "
            f"(built for {limits.max_seq_len} in all; shorten the prompt or max_new_tokens)"
        )
    if images is not None and images.pixel_values.shape[1] > limits.max_images:
        problems.append(
            f"{images.pixel_values.shape[1]} images per prompt (built for {limits.max_images})"
        )
    if images is not None and len(images.num_tiles) != len(prompts):
        problems.append(f"images for {len(images.num_tiles)} prompts but {len(prompts)} prompts")
    return problems


# -- the text graphs' feed -------------------------------------------------------------------


def prompt_feed(
    config: MllamaConfig, prompts: list[list[int]], images: PreprocessedImages | None
) -> dict[str, np.ndarray]:
    """Left-pads the prompts and derives positions, the cross-attention mask and the logit
    positions (the last one: every row's last token is at S - 1)."""
    s = max(len(p) for p in prompts)
    ids = np.full((len(prompts), s), config.text.pad_token_id or 0, np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, s - len(prompt) :], mask[row, s - len(prompt) :] = prompt, 1
    positions = np.where(mask != 0, mask.cumsum(1) - 1, 1)
    tiles = images.num_tiles if images is not None else [[] for _ in prompts]
    xmask = cross_attention_mask_from_ids(
        ids.tolist(), tiles, config.image_token_id, config.vision.max_num_tiles
    )
    num_images = 1 if images is None else max(1, images.pixel_values.shape[1])
    if xmask.shape[2] < num_images:
        xmask = np.pad(xmask, ((0, 0), (0, 0), (0, num_images - xmask.shape[2]), (0, 0)))
    return {
        "input_ids": ids,
        "position_ids": positions,
        "attention_mask": mask,
        "cross_attention_mask": xmask,
        "logit_positions": logit_positions(s),
    }


def _image_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """Rows [start, end) that each image attends, as transformers' get_cross_attention_token_mask.

    An image attends from its own token to the next image that is not directly after it, so a
    run of consecutive image tokens shares the text that follows the run.
    """
    locs = [i for i, t in enumerate(ids) if t == image_token_id]
    spans: list[tuple[int, int]] = []
    end = len(ids)
    for k in reversed(range(len(locs))):
        if k + 1 < len(locs) and locs[k + 1] != locs[k] + 1:
            end = locs[k + 1]
        spans.append((locs[k], end))
    return spans[::-1]


def _check_batch(input_ids: Sequence[Sequence[int]], num_tiles: Sequence[Sequence[int]]) -> None:
    if len(input_ids) == 0 or len(input_ids) != len(num_tiles):
        raise MllamaExportError(
            f"Got {len(input_ids)} token rows and {len(num_tiles)} num_tiles rows; expected one "
            "num_tiles list per sample and at least one sample."
        )
    if len({len(row) for row in input_ids}) != 1:
        raise MllamaExportError(
            f"input_ids rows have lengths {sorted({len(r) for r in input_ids})}; expected ids "
            "already padded to one length."
        )


def _check_images(b: int, num_images: int, tiles: Sequence[int], max_num_tiles: int) -> None:
    # transformers would silently misalign images with their text; we say what is wrong.
    if num_images != len(tiles):
        raise MllamaExportError(
            f"Sample {b} has {num_images} image tokens but {len(tiles)} images were given; "
            "expected one image per image token."
        )
    if any(not 1 <= t <= max_num_tiles for t in tiles):
        raise MllamaExportError(
            f"Sample {b} has tile counts {list(tiles)}; expected 1..{max_num_tiles}."
        )


def cross_attention_mask_from_ids(
    input_ids: Sequence[Sequence[int]],
    num_tiles: Sequence[Sequence[int]],
    image_token_id: int,
    max_num_tiles: int,
) -> np.ndarray:
    """The int64 [batch, seq_len, max_num_images, max_num_tiles] mask MllamaProcessor builds.

    `input_ids` must already be padded to one length, on either side: pad ids are never the
    image token, so left-padding rows (before any image) come out all zero, exactly as in
    transformers. `num_tiles[b][i]` is the tile count of image i of sample b.
    """
    _check_batch(input_ids, num_tiles)
    spans = [_image_spans(row, image_token_id) for row in input_ids]
    for b, (sample_spans, tiles) in enumerate(zip(spans, num_tiles, strict=True)):
        _check_images(b, len(sample_spans), tiles, max_num_tiles)
    max_images = max(len(s) for s in spans)
    mask = np.zeros((len(input_ids), len(input_ids[0]), max_images, max_num_tiles), np.int64)
    for b, (sample_spans, tiles) in enumerate(zip(spans, num_tiles, strict=True)):
        for i, ((start, end), n) in enumerate(zip(sample_spans, tiles, strict=True)):
            mask[b, start:end, i, :n] = 1
    return mask
