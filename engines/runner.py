"""Chains vision -> prefill -> decode steps over any backend to turn prompts into tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.limits import Limits

from .backend import Backend
from .inputs import InputProcessor, Prompt, check_request, prompt_feed
from .preprocess import ImageProcessorConfig, ImageSource, PreprocessedImages
from .sampling import Sampling, TokenPicker
from .steps import KVCache, chunk_feed, decode_feed, logit_positions, one_slot_feed
from .store import NumpyStore, numpy_dtype
from .text import Tokenizer


@dataclass
class Generation:
    token_ids: list[list[int]]  # generated tokens per prompt, up to and including a stop token
    prefill_logits: np.ndarray | None = None  # [B, S, V], every position, when asked for
    step_logits: list[np.ndarray] = field(default_factory=list)  # [B, V] per step when asked for
    timings: dict[str, float] = field(default_factory=dict)
    cache_bytes_per_step: int = 0  # bytes the runner copied into its buffers per decode step
    prompt_mask: np.ndarray | None = None  # [B, S] 1 for a real prompt token, with the logits


@dataclass
class TextGeneration:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)


class Runner:
    """Generates tokens by chaining the graphs; the backends do all model arithmetic.

    `prefill` runs the prefill graph; None when the artifacts have no prefill engine (a
    shared text engine: `build --text-engine shared`), and prompts then go through the
    step graph. `decode` runs the step graph (graphs/model.py DecodeGraph): decode steps,
    chunked prefill and a shared engine's prefill. A step backend may take a limited number
    of new tokens per call (`max_step_tokens`: 1 for a split decode engine, the profiles'
    top for a shared one; none for ONNX Runtime). With a tokenizer (and an image config)
    it also takes text, chat messages and image files (`generate`, `stream`).
    """

    def __init__(
        self,
        config: MllamaConfig,
        vision: Backend,
        prefill: Backend | None,
        decode: Backend,
        limits: Limits,
        model_dtype: str = "float32",
        tokenizer: Tokenizer | None = None,
        image_config: ImageProcessorConfig | None = None,
    ):
        self.config, self.limits, self.dtype = config, limits, numpy_dtype(model_dtype)
        self.vision, self.prefill, self.decode = vision, prefill, decode
        self.store = getattr(decode, "store", None) or NumpyStore()
        self.inputs = InputProcessor.for_config(config, limits, tokenizer, image_config)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.inputs.tokenizer

    @property
    def image_config(self) -> ImageProcessorConfig | None:
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
            art.config, *art.backends, Limits(**art.limits), art.io_dtype,
            tokenizer=art.tokenizer, image_config=art.image_config,
        )  # fmt: skip

    @classmethod
    def from_model(cls, model, limits: Limits) -> Runner:
        """Our PyTorch graphs of an in-memory `graphs.model.MllamaModel` (float32), each run
        by a TorchBackend: the reference the gate and FP8 calibration run."""
        from mllama_export.graphs.model import GRAPH_MODULES

        from .backend import TorchBackend

        backends = (TorchBackend(module(model)) for module in GRAPH_MODULES.values())
        return cls(model.config, *backends, limits)

    def encode(
        self, prompt: Prompt, images: Sequence[ImageSource] = ()
    ) -> tuple[list[int], PreprocessedImages | None]:
        """Token ids and preprocessed images, exactly as transformers' MllamaProcessor makes
        them (engines/inputs.py InputProcessor.encode). The number of `<|image|>` tokens must
        equal the number of images, and the images may not exceed the artifacts' max_images;
        either mistake, and any unreadable image, raises MllamaExportError naming it."""
        return self.inputs.encode(prompt, images)

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
        stop = tok.eos_token_ids | set(self.config.text.eos_token_ids)
        steps = self.iter_steps(
            [ids], batch, max_new_tokens, sampling, stop, result, prefill_chunk=prefill_chunk
        )
        return _Run(tok, ids, result, steps)

    def generate_ids(
        self,
        prompts: list[list[int]],
        images: PreprocessedImages | None = None,
        max_new_tokens: int = 20,
        sampling: Sampling | None = None,
        stop_tokens: set[int] | None = None,
        keep_logits: bool = False,
        prefill_chunk: int | None = None,
        forced: np.ndarray | None = None,
    ) -> Generation:
        """Token ids in, generated token ids out. Prompts are left-padded into one batch.

        prefill_chunk=N pushes the prompt through the step graph N tokens at a time (the last
        chunk may be shorter), so prefill's activations are bounded by N, not by the prompt.
        forced ([max_new_tokens, B], teacher forcing, as the accuracy gate does): the tokens
        fed at each step instead of the chosen ones; token_ids then holds them."""
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
        images: PreprocessedImages | None,
        max_new_tokens: int,
        sampling: Sampling | None,
        stop_tokens: set[int] | None,
        result: Generation,
        keep_logits: bool = False,
        prefill_chunk: int | None = None,
        forced: np.ndarray | None = None,
    ) -> Iterator[np.ndarray]:
        """Yields each step's tokens [B] as soon as they are chosen, filling `result`."""
        stop = set(self.config.text.eos_token_ids) if stop_tokens is None else set(stop_tokens)
        check_request(self.config, self.limits, prompts, images, max_new_tokens)
        self._check_steps(len(prompts), max_new_tokens, prefill_chunk, forced)
        feed = prompt_feed(self.config, prompts, images)
        if keep_logits:  # every position's logits, not only the last one's
            feed["logit_positions"] = logit_positions(feed["input_ids"].shape[1], None)
        xk, xv = self._cross_kv(images, len(prompts), result.timings)
        start = time.perf_counter()
        capacity = feed["input_ids"].shape[1] + max_new_tokens
        cache = KVCache(self.config, len(prompts), capacity, self.store, self.dtype)
        logits = self._prefill(feed, xk, xv, cache, prefill_chunk, result, keep_logits)
        result.timings["prefill_s"] = time.perf_counter() - start
        step_inputs = {
            "position_ids": feed["position_ids"][:, -1:].copy(),
            "cross_attention_mask": feed["cross_attention_mask"][:, -1:].copy(),
            "cross_key": xk,
            "cross_value": xv,
        }
        yield from self._decode_loop(
            logits, cache, step_inputs, result, max_new_tokens, stop, sampling, forced
        )

    def _prefill(self, feed, xk, xv, cache, chunk, result, keep) -> np.ndarray:
        """Fills the cache with the prompt; returns the logits of its last position [B, V].

        The prefill graph when there is one and no chunk is asked for; else the step graph:
        the whole prompt against one masked past slot when the step backend takes that many
        new tokens, or chunks (of `chunk`, or of the most the backend takes) against the
        cache, each chunk seeing the slots the earlier ones filled."""
        s = feed["input_ids"].shape[1]
        limit = self.max_step_tokens()
        if chunk is None and self.prefill is not None:
            out = self.prefill.infer({**feed, "cross_key": xk, "cross_value": xv})
            cache.write(out["present_key"], out["present_value"], feed["attention_mask"])
            pieces, calls = [out["logits"]], 1
        elif chunk is None and (limit is None or s <= limit):
            out = self.decode.infer(
                one_slot_feed(feed, self.config, self.store, self.dtype, xk, xv)
            )
            cache.write(out["new_key"], out["new_value"], feed["attention_mask"])
            pieces, calls = [out["logits"]], 1
        else:
            chunk = chunk or limit
            pieces = []
            for a in range(0, s, chunk):
                b = min(a + chunk, s)
                out = self.decode.infer(chunk_feed(feed, a, b, cache, xk, xv, keep))
                cache.write(out["new_key"], out["new_value"], feed["attention_mask"][:, a:b])
                pieces.append(out["logits"])
            calls = len(pieces)
        result.timings["prefill_calls"] = calls
        last = self.store.host(pieces[-1][:, -1])  # position S - 1 either way
        if keep:
            result.prefill_logits = np.concatenate([self.store.host(p) for p in pieces], axis=1)
            result.prompt_mask = feed["attention_mask"]
        return last

    def max_step_tokens(self) -> int | None:
        """The most new tokens one call of the step backend takes (None: any)."""
        return getattr(self.decode, "max_step_tokens", None)

    def _decode_loop(
        self, logits, cache, step_inputs, result, max_new_tokens, stop, sampling, forced
    ):
        # Finished rows keep stepping with the pad token, as transformers' generate does.
        pick = TokenPicker(sampling or Sampling())
        pad = self.config.text.pad_token_id or 0
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
            step_inputs["position_ids"] += 1
            out = self.decode.infer(decode_feed(tokens, cache, step_inputs))
            result.cache_bytes_per_step = cache.write(
                out["new_key"], out["new_value"], np.ones((len(tokens), 1), np.int64)
            )
            logits = self.store.host(out["logits"][:, -1])
            if result.prefill_logits is not None:
                result.step_logits.append(logits)
            tokens = pick(logits) if forced is None else forced[step + 1]
            steps += 1
        result.timings.update(decode_s=time.perf_counter() - start, decode_steps=steps)

    def _check_steps(self, batch: int, max_new_tokens: int, chunk, forced) -> None:
        """prefill_chunk and forced tokens, refused before any work."""
        limit = self.max_step_tokens()
        if chunk is not None:
            if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
                raise MllamaExportError(
                    f"prefill_chunk {chunk!r}: expected a positive number of prompt tokens"
                )
            if limit is not None and chunk > limit:
                raise MllamaExportError(
                    f"prefill_chunk {chunk}: this step engine takes at most {limit} new "
                    "token(s) per call ("
                    + (
                        "a split decode engine takes one: rebuild with --text-engine shared "
                        "for chunks, or run on ONNX Runtime"
                        if limit == 1
                        else f"its profiles' top); use a prefill_chunk of 1..{limit}"
                    )
                    + ")"
                )
        if forced is not None and np.shape(forced) != (max_new_tokens, batch):
            raise MllamaExportError(
                f"forced tokens of shape {list(np.shape(forced))}; expected "
                f"[max_new_tokens {max_new_tokens}, batch {batch}]"
            )

    def _cross_kv(
        self, images: PreprocessedImages | None, batch: int, timings: dict
    ) -> tuple[np.ndarray, np.ndarray]:
        if images is None or images.pixel_values.shape[1] == 0:
            # No image in the batch: one image slot of zero K/V that no row may see. Every
            # cross-attention layer is then exactly the identity under both mask semantics
            # (zero values give a zero attention output; the row mask zeroes the MLP), and
            # no dim is ever zero, which engines with optimization profiles dislike.
            t, v = self.config.text, self.config.vision
            tokens = v.max_num_tiles * v.num_patches
            shape = (len(t.cross_attention_layers), batch, t.num_kv_heads, tokens, t.head_dim)
            return self.store.zeros(shape, self.dtype), self.store.zeros(shape, self.dtype)
        start = time.perf_counter()
        out = self.vision.infer(
            {
                "pixel_values": images.pixel_values.astype(self.dtype, copy=False),
                "aspect_ratio_ids": images.aspect_ratio_ids.astype(np.int64, copy=False),
                "aspect_ratio_mask": images.aspect_ratio_mask.astype(np.int64, copy=False),
            }
        )
        timings["vision_s"] = time.perf_counter() - start
        return out["cross_key"], out["cross_value"]


@dataclass
class _Run:
    tokenizer: Tokenizer
    prompt_ids: list[int]
    result: Generation
    steps: Iterator

    def finish(self) -> TextGeneration:
        ids = self.result.token_ids[0]
        return TextGeneration(self.tokenizer.decode(ids), ids, self.prompt_ids, self.result.timings)
