"""From what a user holds (a prompt or chat messages, image files) to text, on any backend."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mllama_export.errors import MllamaExportError

from .preprocess import ImageProcessorConfig, ImageSource, PreprocessedImages, preprocess
from .runner import Generation, Runner
from .sampling import Sampling
from .text import IMAGE_TOKEN, Tokenizer

Prompt = str | list[dict[str, Any]]  # plain text, or chat messages with image parts


@dataclass
class TextGeneration:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)


class TextRunner(Runner):
    """A Runner that also owns the checkpoint's tokenizer and image preprocessing."""

    tokenizer: Tokenizer | None = None
    image_config: ImageProcessorConfig | None = None

    def encode(
        self, prompt: Prompt, images: Sequence[ImageSource] = ()
    ) -> tuple[list[int], PreprocessedImages | None]:
        """Token ids and preprocessed images, exactly as transformers' MllamaProcessor makes them.

        A plain string is what `processor(images=images, text=prompt)` gives, quirks included:
        the processor puts BOS text after any leading `<|image|>` tokens and its tokenizer then
        adds another BOS, so "hi" -> [BOS, BOS, hi] and "<|image|>hi" -> [BOS, IMG, BOS, hi];
        image tokens elsewhere in the text stay where they are. One convenience beyond the
        processor (which refuses it): a string with no `<|image|>` at all but with images gets
        one `<|image|>` per image in front, i.e. the ids of `"<|image|>" * n + prompt`.

        Chat messages ({"role", "content"} dicts whose content is a string or a list of
        {"type": "text", "text": ...} and {"type": "image"} parts) give the ids of the usual
        reference flow: `processor.apply_chat_template(messages, add_generation_prompt=True)`,
        then `processor(images=images, text=rendered, add_special_tokens=False)` (one BOS).

        The number of `<|image|>` tokens must equal the number of images (one image per
        token, in order), and the images may not exceed the artifacts' max_images; either
        mistake, and any unreadable image, raises MllamaExportError naming the problem.
        """
        tok = self._need_tokenizer()
        images = _as_image_list(images)
        if isinstance(prompt, str) and not prompt.strip() and not images:
            raise MllamaExportError(
                f"the prompt is {'empty' if not prompt else 'only whitespace'} and no image was "
                "given; expected some text, or an image with an empty prompt"
            )
        if isinstance(prompt, str):
            text, add_special_tokens, what = (
                with_image_tokens(prompt, len(images)),
                True,
                "the prompt",
            )
        elif isinstance(prompt, list | tuple):
            text = tok.apply_chat_template(prompt, add_generation_prompt=True)
            add_special_tokens, what = False, "the chat messages"
        else:
            raise MllamaExportError(
                f"prompt is a {type(prompt).__name__}; expected a string or a list of chat "
                "messages ({'role': ..., 'content': ...} dicts)"
            )
        self._check_image_count(text.count(IMAGE_TOKEN), len(images), what)
        ids = tok.processor_encode(text, add_special_tokens=add_special_tokens)
        if not images:
            return ids, None
        if self.image_config is None:
            raise MllamaExportError(
                "these artifacts have no preprocessor_config.json; images cannot be read"
            )
        return ids, preprocess([images], self.image_config)

    def iter_steps(self, prompts, images, *args, **kwargs) -> Iterator[np.ndarray]:
        _check_prompt_ids(prompts, self.config.text.embedding_rows)
        return super().iter_steps(prompts, images, *args, **kwargs)

    def _check_image_count(self, tokens: int, images: int, what: str) -> None:
        if tokens != images:
            chat = what != "the prompt"
            raise MllamaExportError(
                f"{what} hold{'' if chat else 's'} {tokens} {IMAGE_TOKEN} token"
                f"{'s' * (tokens != 1)}{' (one per image part)' if chat else ''} but {images} "
                f"image{'s' * (images != 1)} {'was' if images == 1 else 'were'} given; give "
                f"one image per {'image part' if chat else IMAGE_TOKEN + ' token'}"
            )
        if images > self.limits.max_images:
            raise MllamaExportError(
                f"{images} images were given but these artifacts were built for at most "
                f"{self.limits.max_images} per prompt (max_images); give fewer images or "
                "rebuild with a larger max_images"
            )

    def generate(
        self,
        prompt: Prompt,
        images: Sequence[ImageSource] = (),
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        prefill_chunk: int | None = None,
    ) -> TextGeneration:
        """prefill_chunk=N: the prompt goes through the step graph N tokens at a time."""
        run = self._start(prompt, images, max_new_tokens, sampling, prefill_chunk)
        for _ in run.steps:
            pass
        return run.finish()

    def stream(
        self,
        prompt: Prompt,
        images: Sequence[ImageSource] = (),
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        errors: str = "replace",
        done: TextGeneration | None = None,
        prefill_chunk: int | None = None,
    ) -> Iterator[str]:
        """Yields text pieces as tokens arrive; multi-byte characters are never split. Bytes
        that never form a character become U+FFFD, or with ``errors="backslashreplace"``
        escapes such as ``\\x80``. ``done``, if given, is filled in at the end with what
        ``generate`` would have returned (token ids, timings). prefill_chunk: as ``generate``."""
        run = self._start(prompt, images, max_new_tokens, sampling, prefill_chunk)
        decoder = self._need_tokenizer().stream_decoder(errors=errors)
        for tokens in run.steps:
            if tokens[0] >= 0 and (piece := decoder.push(int(tokens[0]))):
                yield piece
        if tail := decoder.finish():
            yield tail
        if done is not None:
            vars(done).update(vars(run.finish()))

    def _start(self, prompt, images, max_new_tokens, sampling, prefill_chunk) -> _Run:
        ids, batch = self.encode(prompt, images)
        result = Generation([[]])
        stop = self._need_tokenizer().eos_token_ids | set(self.config.text.eos_token_ids)
        steps = self.iter_steps(
            [ids], batch, max_new_tokens, sampling, stop, result, prefill_chunk=prefill_chunk
        )
        return _Run(self._need_tokenizer(), ids, result, steps)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise MllamaExportError(
                "these artifacts have no tokenizer.json; pass token ids (generate_ids, --token-ids)"
            )
        return self.tokenizer


def _as_image_list(images: Sequence[ImageSource] | ImageSource | None) -> list[ImageSource]:
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


def _is_token(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_prompt_ids(prompts: object, rows: int) -> None:
    """Prompts as a list of token-id lists, every id a row of the embedding."""
    rows_ok = isinstance(prompts, list | tuple | np.ndarray) and all(
        isinstance(p, list | tuple | np.ndarray) for p in prompts
    )
    if not rows_ok:
        raise MllamaExportError(
            f"prompts is {type(prompts).__name__} {prompts!r:.60}; expected a list of token-id "
            "lists, one per prompt, e.g. [[500, 512, 12]]"
        )
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not _is_token(t)]
        if bad:
            raise MllamaExportError(
                f"prompt {i} holds {bad[0]!r} ({type(bad[0]).__name__}); expected integer token ids"
            )
        outside = [int(t) for t in prompt if not 0 <= t < rows]
        if outside:
            raise MllamaExportError(
                f"prompt {i} holds token id(s) {outside[:5]} outside the vocabulary; expected "
                f"ids in 0..{rows - 1}"
            )


@dataclass
class _Run:
    tokenizer: Tokenizer
    prompt_ids: list[int]
    result: Generation
    steps: Iterator

    def finish(self) -> TextGeneration:
        ids = self.result.token_ids[0]
        return TextGeneration(self.tokenizer.decode(ids), ids, self.prompt_ids, self.result.timings)


def with_image_tokens(prompt: str, num_images: int) -> str:
    """A plain prompt given images but no <|image|> gets one per image in front, where the
    model card's examples put them (the reference processor would refuse it instead)."""
    if num_images and IMAGE_TOKEN not in prompt:
        return IMAGE_TOKEN * num_images + prompt
    return prompt
