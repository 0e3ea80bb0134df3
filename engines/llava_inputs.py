"""LLaVA's "inputs" part: a prompt, chat messages or token ids, and images -> token ids (each
image's tokens expanded, as LlavaProcessor / LlavaNextProcessor make them) and the vision
graph's tiles, refused in one line when they do not fit the model or the artifacts.

The API is Mllama's (engines/inputs.py InputProcessor): `for_config`, `from_folder`,
`.tokenizer`, `.image_config` (here the checkpoint's LlavaProcessorConfig), `encode`,
`need_tokenizer` and `check_request`. The images of a batch travel as one LlavaImages
(engines/llava_preprocess.py): every tile of every image in prompt order, with each row's
image sizes, from which the session builds the prefill's image_layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_layout import ImageSize, check_image_tokens, image_token_count
from mllama_export.graphs.llava_layout import image_tiles as tiles_of

from .images import ImageSource
from .llava_preprocess import LlavaImages, LlavaProcessorConfig, preprocess_llava
from .llava_text import encode_llava_prompt
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
from .text import Prompt, Tokenizer

IMAGE_PLACEHOLDER = "<image>"  # what llava-hf's processors name it, when no processor config says


class Encoded(NamedTuple):
    ids: list[int]  # one prompt's token ids, image tokens expanded, unpadded
    images: LlavaImages | None  # one row; None: no image


def folder_resources(folder: str | Path) -> tuple[Tokenizer | None, LlavaProcessorConfig | None]:
    """The tokenizer and processor settings of an artifact or checkpoint folder, where it has
    them (a folder without tokenizer.json still runs token ids)."""
    folder = Path(folder)
    tokenizer = Tokenizer.from_dir(folder) if (folder / "tokenizer.json").is_file() else None
    has_processor = (folder / "processor_config.json").is_file()
    return tokenizer, LlavaProcessorConfig.from_dir(folder) if has_processor else None


def stack_images(rows: Sequence[LlavaImages | None]) -> LlavaImages | None:
    """The images of single-prompt encodings (Encoded.images, None for text only) as one
    batch's, in row order; None when no row has an image."""
    if all(r is None for r in rows):
        return None
    real = [r for r in rows if r is not None]
    pixels = np.concatenate([r.pixel_values for r in real])
    sizes = [[] if r is None else [s for row in r.image_sizes for s in row] for r in rows]
    tiles = [[] if r is None else [t for row in r.num_tiles for t in row] for r in rows]
    return LlavaImages(pixels, sizes, tiles)


@dataclass(frozen=True)
class LlavaInputProcessor:
    """Prompts, chat messages or token ids and images -> ids and tiles, exactly as
    transformers' LlavaProcessor / LlavaNextProcessor make them (engines/llava_text.py,
    engines/llava_preprocess.py)."""

    config: LlavaConfig
    limits: Limits | None = None  # None: max_images is not checked here
    tokenizer: Tokenizer | None = None
    image_config: LlavaProcessorConfig | None = None

    @classmethod
    def for_config(
        cls,
        config: LlavaConfig,
        limits: Limits | None = None,
        tokenizer: Tokenizer | None = None,
        image_config: LlavaProcessorConfig | None = None,
    ) -> LlavaInputProcessor:
        if image_config is not None:
            image_config.check_against(config)
        return cls(config, limits, tokenizer, image_config)

    @classmethod
    def from_folder(
        cls, folder: str | Path, config: LlavaConfig, limits: Limits | None = None
    ) -> LlavaInputProcessor:
        return cls.for_config(config, limits, *folder_resources(folder))

    @property
    def placeholder(self) -> str:
        return self.image_config.image_token if self.image_config else IMAGE_PLACEHOLDER

    def encode(
        self,
        prompt: Prompt | None = None,
        images: Sequence[ImageSource] | ImageSource | None = (),
        *,
        token_ids: Sequence[int] | None = None,
        ids_name: str = "the token ids",
        images_name: str = "image(s)",
    ) -> Encoded:
        """A plain string is what `processor(text=prompt, images=images)` gives: each
        `<image>` expanded to its image's tokens, BOS from the tokenizer. One convenience
        beyond the processor: a string without `<image>` but with images gets one
        `<image>\\n` per image in front, where llava-hf's prompts put them.

        Chat messages ({"role", "content"} dicts, content a string or a list of
        {"type": "text", "text": ...} and {"type": "image"} parts) give the ids of
        `processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`.

        token_ids are used as given: each image's tokens already expanded, one run per image,
        in order (ids_name and images_name name them in errors, as the CLI's --token-ids and
        --image)."""
        images = as_image_list(images)
        if prompt is not None and token_ids is not None:
            raise MllamaExportError("give exactly one of a prompt and token ids, not both")
        if token_ids is not None:
            ids = self._given_ids(token_ids, ids_name)
            check_max_images(self.limits, len(images))
            pixels = self._preprocess(images)
            self._check_id_images(ids, pixels, ids_name, images_name)
            return Encoded(ids, pixels)
        text, special = self._render(prompt, images)
        pixels = self._preprocess(images)
        sizes = [] if pixels is None else pixels.image_sizes[0]
        tok = self.need_tokenizer()
        if self.image_config is None:  # text only: nothing to expand
            return Encoded(tok.backend.encode(text, add_special_tokens=special).ids, None)
        return Encoded(encode_llava_prompt(tok, text, sizes, self.image_config, special), pixels)

    def _given_ids(self, token_ids: object, ids_name: str) -> list[int]:
        ids = given_ids(token_ids, ids_name)
        check_ids(ids, self.config.vocab_size, f"{ids_name} hold")
        if not ids:
            raise MllamaExportError(f"{ids_name} are empty; expected at least one token id")
        return [int(t) for t in ids]

    def _render(self, prompt: Prompt, images: list[ImageSource]) -> tuple[str, bool]:
        """The prompt's text, whether the tokenizer adds BOS, its placeholders checked."""
        tok, mark = self.need_tokenizer(), self.placeholder
        if isinstance(prompt, str):
            check_prompt_text(prompt, images)
            text = prompt if mark in prompt or not images else f"{mark}\n" * len(images) + prompt
            self._check_placeholders(text.count(mark), len(images), "the prompt holds")
            return text, True
        if isinstance(prompt, list | tuple):
            text = tok.apply_chat_template(prompt, add_generation_prompt=True)
            what = "the chat messages hold"
            self._check_placeholders(text.count(mark), len(images), what, "image part")
            # the processor adds no second BOS to a template that renders one
            return text, not (tok.bos_token and text.startswith(tok.bos_token))
        raise prompt_type_error(prompt)

    def _check_placeholders(self, found: int, images: int, what: str, per: str = "") -> None:
        if found != images:
            raise MllamaExportError(
                f"{what} {found} {self.placeholder} placeholder(s)"
                f"{f' ({per}s)' if per else ''} but {images} image(s) were given; give one "
                f"image per {per or self.placeholder}"
            )
        check_max_images(self.limits, images)

    def _check_id_images(self, ids, pixels: LlavaImages | None, ids_name, images_name) -> None:
        sizes = [] if pixels is None else pixels.image_sizes[0]
        try:
            check_image_tokens([ids], [sizes], self.config)
        except MllamaExportError:
            need = [image_token_count(self.config, s) for s in sizes]
            raise MllamaExportError(
                f"{ids_name} hold {ids.count(self.config.image_token_id)} image tokens (id "
                f"{self.config.image_token_id}) but the {len(sizes)} {images_name} given need "
                f"{sum(need)}"
                + (
                    f" ({need}: one run per image, in order, as the processor expands them for "
                    "these image sizes)"
                    if need
                    else " (ids without images hold no image token)"
                )
            ) from None

    def _preprocess(self, images: list[ImageSource]) -> LlavaImages | None:
        if not images:
            return None
        if self.image_config is None:
            raise MllamaExportError(
                "these artifacts have no processor_config.json; images cannot be read "
                "(expected the checkpoint's processor files beside the graphs)"
            )
        return preprocess_llava([images], self.image_config.image)

    def need_tokenizer(self) -> Tokenizer:
        return need_tokenizer(self.tokenizer)

    def check_request(
        self, prompts: object, images: LlavaImages | None, max_new_tokens: int
    ) -> None:
        """A batch of token-id prompts and its images, before any graph runs."""
        check_rows(prompts)
        for i, prompt in enumerate(prompts):
            check_ids(prompt, self.config.vocab_size, f"prompt {i} holds")
        problems = self._request_problems(prompts, images, max_new_tokens)
        if problems:
            raise MllamaExportError("cannot generate: " + "; ".join(problems))
        sizes = [[] for _ in prompts] if images is None else images.image_sizes
        try:
            check_image_tokens(prompts, sizes, self.config)
        except MllamaExportError as err:
            raise MllamaExportError(f"cannot generate: {err}") from None

    def _request_problems(self, prompts, images, max_new_tokens: int) -> list[str]:
        limits, problems = self.limits, []
        if limits is not None and (not prompts or len(prompts) > limits.max_batch):
            problems.append(f"a batch of {len(prompts)} prompts (built for 1..{limits.max_batch})")
        if not prompts or any(len(p) == 0 for p in prompts):
            problems.append("an empty prompt (at least one token is needed)")
        if max_new_tokens < 1:
            problems.append(f"max_new_tokens {max_new_tokens} (must be at least 1)")
        longest = max((len(p) for p in prompts), default=0)
        if limits is not None and longest + max_new_tokens > limits.max_seq_len:
            problems.append(
                f"a prompt of {longest} tokens plus {max_new_tokens} new tokens "
                f"(built for {limits.max_seq_len} in all; shorten the prompt or max_new_tokens)"
            )
        if images is not None:
            problems += self._image_problems(images, len(prompts))
        return problems

    def _image_problems(self, images: Any, batch: int) -> list[str]:
        if not isinstance(images, LlavaImages):
            return [
                f"images of type {type(images).__name__} (expected LlavaImages, as encode gives)"
            ]
        problems = []
        if len(images.image_sizes) != batch:
            problems.append(f"images for {len(images.image_sizes)} prompts but {batch} prompts")
        most = max((len(row) for row in images.image_sizes), default=0)
        if self.limits is not None and most > self.limits.max_images:
            problems.append(f"{most} images per prompt (built for {self.limits.max_images})")
        need = sum(tiles_of(self.config, tuple(s)) for row in images.image_sizes for s in row)
        v = self.config.vision
        shape = (need, v.num_channels, v.image_size, v.image_size)
        got = tuple(np.shape(images.pixel_values))
        if got[:1] != shape[:1] or (need and got != shape):
            problems.append(f"pixel_values of shape {list(got)} for images that take {list(shape)}")
        return problems


def image_sizes_of(images: LlavaImages | None, batch: int) -> list[list[ImageSize]]:
    """Each row's image sizes, empty rows for a batch without images."""
    if images is None:
        return [[] for _ in range(batch)]
    return [[(int(h), int(w)) for h, w in row] for row in images.image_sizes]
