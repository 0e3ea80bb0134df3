"""From what a user holds (a prompt or chat messages, image files) to text, on any backend."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mllama_export.errors import MllamaExportError

from .preprocess import ImageProcessorConfig, ImageSource, preprocess
from .runner import Generation, Runner
from .sampling import Sampling
from .text import Tokenizer

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

    def encode(self, prompt: Prompt, images: Sequence[ImageSource] = ()):
        """Token ids and preprocessed images, as the reference processor would make them."""
        tok = self._need_tokenizer()
        if isinstance(prompt, str):
            text = prompt
            if images and tok.image_token_id not in tok.encode(text, add_bos=False):
                # A plain prompt with images: the images go first, as in the model card's examples.
                text = "<|image|>" * len(images) + text
        else:
            text = tok.apply_chat_template(prompt, add_generation_prompt=True)
        ids = tok.encode(text, add_bos=True)
        if not images:
            return ids, None
        if self.image_config is None:
            raise MllamaExportError(
                "these artifacts have no preprocessor_config.json; images cannot be read"
            )
        return ids, preprocess([list(images)], self.image_config)

    def generate(
        self,
        prompt: Prompt,
        images: Sequence[ImageSource] = (),
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
    ) -> TextGeneration:
        pieces = []
        result = self._start(prompt, images, max_new_tokens, sampling, pieces)
        for _ in result.steps:
            pass
        return result.finish(pieces)

    def stream(
        self,
        prompt: Prompt,
        images: Sequence[ImageSource] = (),
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
    ) -> Iterator[str]:
        """Yields text pieces as tokens arrive; multi-byte characters are never split."""
        run = self._start(prompt, images, max_new_tokens, sampling, [])
        decoder = self._need_tokenizer().stream_decoder()
        for tokens in run.steps:
            if tokens[0] >= 0 and (piece := decoder.push(int(tokens[0]))):
                yield piece
        if tail := decoder.finish():
            yield tail

    def _start(self, prompt, images, max_new_tokens, sampling, pieces) -> _Run:
        ids, batch = self.encode(prompt, images)
        result = Generation([[]])
        stop = self._need_tokenizer().eos_token_ids | set(self.config.text.eos_token_ids)
        steps = self.iter_steps([ids], batch, max_new_tokens, sampling, stop, result)
        return _Run(self._need_tokenizer(), ids, result, steps)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise MllamaExportError(
                "these artifacts have no tokenizer.json; pass token ids (generate_ids, --token-ids)"
            )
        return self.tokenizer


@dataclass
class _Run:
    tokenizer: Tokenizer
    prompt_ids: list[int]
    result: Generation
    steps: Iterator

    def finish(self, _pieces) -> TextGeneration:
        ids = self.result.token_ids[0]
        return TextGeneration(self.tokenizer.decode(ids), ids, self.prompt_ids, self.result.timings)
