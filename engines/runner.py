"""Generates tokens from prompts over any family's graphs, on any backend.

The runner owns what every family shares: the request checks (through the family's input
processor), sampling, stop tokens, forced tokens, keeping logits, timings and streaming text.
What a family's graphs need between the prompt and each next token (caches, image features,
which graph runs the prompt) is its "session" part (engines/mllama_session.py documents the
API); the runner builds one session per generation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.family import family_of
from mllama_export.graphs.limits import Limits

from .backend import Backend
from .sampling import Sampling, TokenPicker
from .store import NumpyStore, numpy_dtype
from .text import Prompt, Tokenizer


@dataclass
class Generation:
    token_ids: list[list[int]]  # generated tokens per prompt, up to and including a stop token
    prefill_logits: np.ndarray | None = None  # [B, S, V], every position, when asked for
    step_logits: list[np.ndarray] = field(default_factory=list)  # [B, V] per step when asked for
    timings: dict[str, float] = field(default_factory=dict)
    cache_bytes_per_step: int = 0  # bytes the session copied into its buffers per step
    prompt_mask: np.ndarray | None = None  # [B, S] 1 for a real prompt token, with the logits


@dataclass
class TextGeneration:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)


class Runner:
    """Generates tokens by chaining a family's graphs; the backends do all model arithmetic.

    `backends` maps each graph name of the family (`family.graphs`) to its backend; None
    where the artifacts have no engine for a graph (Mllama's prefill of a shared text engine,
    whose prompts then go through the step graph). A graph's backend is also the runner's
    attribute of that name (`runner.decode`), which tools and tests read and replace. A
    backend may take a limited number of new tokens per call (`max_step_tokens`). With a
    tokenizer (and, for a family with images, an image config) the runner also takes text,
    chat messages and image files (`generate`, `stream`).
    """

    def __init__(
        self,
        config: Any,
        backends: Mapping[str, Backend | None],
        limits: Limits,
        model_dtype: str = "float32",
        tokenizer: Tokenizer | None = None,
        image_config: Any = None,
    ):
        family = family_of(config)
        self.family, self.config, self.limits = family, config, limits
        self.dtype = numpy_dtype(model_dtype)
        self.backends = dict(backends)
        unknown = sorted(set(self.backends) - set(family.graphs))
        if unknown:
            raise MllamaExportError(
                f"backends for {unknown}, which are no graphs of the {family.title} family; "
                f"its graphs are {list(family.graphs)}"
            )
        stores = (getattr(b, "store", None) for b in reversed(self.backends.values()))
        self.store = next((s for s in stores if s is not None), None) or NumpyStore()
        self.inputs = family.part("inputs").for_config(config, limits, tokenizer, image_config)
        self._session = family.part("session")

    def __copy__(self) -> Runner:
        # a copy replaces its backends without touching the original's (the gate's taps)
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__, backends=dict(self.backends))
        return clone

    def __getattr__(self, name: str):
        backends = self.__dict__.get("backends", {})
        if name in backends:
            return backends[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get("backends", {}):
            self.backends[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.inputs.tokenizer

    @property
    def image_config(self) -> Any:
        return self.inputs.image_config

    @classmethod
    def from_artifacts(
        cls,
        folder: str | Path,
        backend: str = "onnxruntime",
        device: str = "cpu",
        io_binding: bool | None = None,
    ) -> Runner:
        """Loads an artifact folder written by `mllama-export build`, after checking its files.

        io_binding keeps caches in device buffers bound by pointer (default: on for CUDA,
        where it keeps them on the GPU; bfloat16 artifacts excepted: numpy has no such type)."""
        from .artifacts import load_artifacts

        art = load_artifacts(folder, backend, device, io_binding)
        return cls(
            art.config, art.backends, Limits(**art.limits), art.io_dtype,
            tokenizer=art.tokenizer, image_config=art.image_config,
        )  # fmt: skip

    @classmethod
    def from_model(cls, model, limits: Limits) -> Runner:
        """The family's PyTorch graphs of an in-memory model (float32), each run by a
        TorchBackend: the reference the gate and FP8 calibration run."""
        from .backend import TorchBackend

        modules = family_of(model.config).part("graph_modules")
        backends = {name: TorchBackend(module(model)) for name, module in modules.items()}
        return cls(model.config, backends, limits)

    def encode(self, prompt: Prompt, images: Sequence[Any] = ()) -> tuple[list[int], Any]:
        """Token ids and preprocessed images, exactly as the family's processor in
        transformers makes them (the family's input processor, e.g. engines/inputs.py
        InputProcessor.encode). Image tokens that do not match the images, more images than
        the artifacts' max_images and any unreadable image raise MllamaExportError naming it."""
        return self.inputs.encode(prompt, images)

    def generate(
        self,
        prompt: Prompt,
        images: Sequence[Any] = (),
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
        images: Sequence[Any] = (),
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
        decoder = self.inputs.need_tokenizer().stream_decoder(errors=errors)
        for tokens in run.steps:
            if tokens[0] >= 0 and (piece := decoder.push(int(tokens[0]))):
                yield piece
        if tail := decoder.finish():
            yield tail
        if done is not None:
            vars(done).update(vars(run.finish()))

    def _start(self, prompt, images, max_new_tokens, sampling, prefill_chunk) -> _Run:
        tok = self.inputs.need_tokenizer()
        ids, batch = self.encode(prompt, images)
        result = Generation([[]])
        stop = tok.eos_token_ids | set(self.config.eos_token_ids)
        steps = self.iter_steps(
            [ids], batch, max_new_tokens, sampling, stop, result, prefill_chunk=prefill_chunk
        )
        return _Run(tok, ids, result, steps)

    def generate_ids(
        self,
        prompts: list[list[int]],
        images: Any = None,
        max_new_tokens: int = 20,
        sampling: Sampling | None = None,
        stop_tokens: set[int] | None = None,
        keep_logits: bool = False,
        prefill_chunk: int | None = None,
        forced: np.ndarray | None = None,
    ) -> Generation:
        """Token ids in, generated token ids out. Prompts are left-padded into one batch.

        images: the family's preprocessed images of the batch (Mllama's PreprocessedImages),
        None for none. prefill_chunk=N pushes the prompt through the step graph N tokens at
        a time (the last chunk may be shorter), so prefill's activations are bounded by N,
        not by the prompt. forced ([max_new_tokens, B], teacher forcing, as the accuracy gate
        does): the tokens fed at each step instead of the chosen ones; token_ids then holds
        them."""
        result = Generation([[] for _ in prompts])
        steps = self.iter_steps(
            prompts, images, max_new_tokens, sampling, stop_tokens, result, keep_logits,
            prefill_chunk=prefill_chunk, forced=forced,
        )  # fmt: skip
        for _ in steps:
            pass
        return result

    def iter_steps(
        self,
        prompts: list[list[int]],
        images: Any,
        max_new_tokens: int,
        sampling: Sampling | None,
        stop_tokens: set[int] | None,
        result: Generation,
        keep_logits: bool = False,
        prefill_chunk: int | None = None,
        forced: np.ndarray | None = None,
    ) -> Iterator[np.ndarray]:
        """Yields each step's tokens [B] as soon as they are chosen, filling `result`."""
        stop = set(self.config.eos_token_ids) if stop_tokens is None else set(stop_tokens)
        self.inputs.check_request(prompts, images, max_new_tokens)
        _check_forced(forced, max_new_tokens, len(prompts))
        session = self._session(self.config, self.backends, self.limits, self.store, self.dtype)
        start = time.perf_counter()
        logits = session.start(prompts, images, max_new_tokens, keep_logits, prefill_chunk, result)
        result.timings.setdefault("prefill_s", time.perf_counter() - start)
        yield from self._decode_loop(
            session, logits, result, max_new_tokens, stop, sampling, forced, keep_logits
        )

    def max_step_tokens(self) -> int | None:
        """The most new tokens one call of the graphs takes (None: any): the smallest a
        backend declares (a split TensorRT decode engine: 1; a shared one: its profiles')."""
        declared = (getattr(b, "max_step_tokens", None) for b in self.backends.values())
        return min((n for n in declared if n is not None), default=None)

    def _decode_loop(
        self, session, logits, result, max_new_tokens, stop, sampling, forced, keep
    ) -> Iterator[np.ndarray]:
        # Finished rows keep stepping with the pad token, as transformers' generate does.
        pick = TokenPicker(sampling or Sampling())
        pad = self.config.pad_token_id or 0
        done = np.zeros(len(result.token_ids), bool)
        tokens = pick(logits) if forced is None else forced[0]
        steps, start = 0, time.perf_counter()
        for step in range(max_new_tokens):
            tokens = np.where(done, pad, tokens)
            for row in np.flatnonzero(~done):
                result.token_ids[row].append(int(tokens[row]))
            yield np.where(done, -1, tokens)
            done |= np.isin(tokens, list(stop))
            if done.all() or step == max_new_tokens - 1:
                break
            logits = session.step(tokens)
            if keep:
                result.step_logits.append(logits)
            tokens = pick(logits) if forced is None else forced[step + 1]
            steps += 1
        result.timings.update(decode_s=time.perf_counter() - start, decode_steps=steps)


def _check_forced(forced, max_new_tokens: int, batch: int) -> None:
    """Forced tokens, refused before any work."""
    if forced is not None and np.shape(forced) != (max_new_tokens, batch):
        raise MllamaExportError(
            f"forced tokens of shape {list(np.shape(forced))}; expected "
            f"[max_new_tokens {max_new_tokens}, batch {batch}]"
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
