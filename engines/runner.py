"""Chains vision -> prefill -> decode steps over any backend to turn prompts into tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.contract import logit_positions

from .backend import Backend
from .preprocess import PreprocessedImages as Images
from .sampling import Sampling, TokenPicker
from .store import NumpyStore
from .text import cross_attention_mask_from_ids

if TYPE_CHECKING:
    from .pipeline import TextRunner


@dataclass(frozen=True)
class Limits:
    """What the graphs or engines were built for; calls outside these are refused."""

    max_batch: int
    max_seq_len: int  # prompt plus generated tokens
    max_images: int


@dataclass
class Generation:
    token_ids: list[list[int]]  # generated tokens per prompt, up to and including a stop token
    prefill_logits: np.ndarray | None = None  # [B, S, V], every position, when asked for
    step_logits: list[np.ndarray] = field(default_factory=list)  # [B, V] per step when asked for
    timings: dict[str, float] = field(default_factory=dict)
    cache_bytes_per_step: int = 0  # bytes the runner copied into its buffers per decode step


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16 of its own

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _Cache:
    """Self-attention K/V in buffers sized once per generation; each step fills one slot.

    The buffers live in the decode backend's store (host arrays, or device tensors bound by
    pointer), so the past is never copied: not into a new tensor, not across to the host.
    """

    def __init__(self, present_k, present_v, mask: np.ndarray, cap: int, store, dtype):
        layers, b, heads, s, dim = present_k.shape
        self.k = store.zeros((layers, b, heads, cap, dim), dtype)
        self.v = store.zeros((layers, b, heads, cap, dim), dtype)
        self.mask = store.zeros((b, cap), np.dtype(np.int64))
        self.k[:, :, :, :s], self.v[:, :, :, :s] = present_k, present_v
        self.mask[:, :s] = store.put(mask)
        self.length = s

    def append(self, new_k: np.ndarray, new_v: np.ndarray) -> int:
        # new_k, new_v: [L, B, H_kv, 1, Dh]
        self.k[:, :, :, self.length] = new_k[:, :, :, 0]
        self.v[:, :, :, self.length] = new_v[:, :, :, 0]
        self.mask[:, self.length] = 1
        self.length += 1
        return new_k.nbytes + new_v.nbytes + self.mask.shape[0] * 8


class Runner:
    """Generates tokens by chaining the three graphs; the backends do all model arithmetic."""

    def __init__(
        self,
        config: MllamaConfig,
        vision: Backend,
        prefill: Backend,
        decode: Backend,
        limits: Limits,
        model_dtype: str = "float32",
    ):
        self.config, self.limits, self.dtype = config, limits, numpy_dtype(model_dtype)
        self.vision, self.prefill, self.decode = vision, prefill, decode
        self.store = getattr(decode, "store", None) or NumpyStore()

    @classmethod
    def from_artifacts(
        cls,
        folder,
        backend: str = "onnxruntime",
        device: str = "cpu",
        io_binding: bool | None = None,
    ) -> TextRunner:
        """Loads an artifact folder written by `mllama-export build`, after checking its files.

        io_binding keeps caches in device buffers bound by pointer (default: on for CUDA)."""
        from .artifacts import load_runner

        return load_runner(folder, backend, device, io_binding)

    def generate_ids(
        self,
        prompts: list[list[int]],
        images: Images | None = None,
        max_new_tokens: int = 20,
        sampling: Sampling | None = None,
        stop_tokens: set[int] | None = None,
        keep_logits: bool = False,
    ) -> Generation:
        """Token ids in, generated token ids out. Prompts are left-padded into one batch."""
        result = Generation([[] for _ in prompts])
        for _ in self.iter_steps(
            prompts, images, max_new_tokens, sampling, stop_tokens, result, keep_logits
        ):
            pass
        return result

    def iter_steps(
        self,
        prompts: list[list[int]],
        images: Images | None,
        max_new_tokens: int,
        sampling: Sampling | None,
        stop_tokens: set[int] | None,
        result: Generation,
        keep_logits: bool = False,
    ) -> Iterator[np.ndarray]:
        """Yields each step's tokens [B] as soon as they are chosen, filling `result`."""
        stop = set(self.config.text.eos_token_ids) if stop_tokens is None else set(stop_tokens)
        self._check_request(prompts, images, max_new_tokens)
        feed = self._prompt_feed(prompts, images)
        if keep_logits:  # every position's logits, not only the last one's
            feed["logit_positions"] = logit_positions(feed["input_ids"].shape[1], None)
        xk, xv = self._cross_kv(images, len(prompts), result.timings)
        start = time.perf_counter()
        out = self.prefill.infer({**feed, "cross_key": xk, "cross_value": xv})
        result.timings["prefill_s"] = time.perf_counter() - start
        logits = self.store.host(out["logits"][:, -1])  # position S - 1 either way
        if keep_logits:
            result.prefill_logits = self.store.host(out["logits"])
        capacity = feed["input_ids"].shape[1] + max_new_tokens
        cache = _Cache(
            out["present_key"],
            out["present_value"],
            feed["attention_mask"],
            capacity,
            self.store,
            self.dtype,
        )
        step_inputs = {
            "position_ids": feed["position_ids"][:, -1:].copy(),
            "cross_attention_mask": feed["cross_attention_mask"][:, -1:].copy(),
            "cross_key": xk,
            "cross_value": xv,
        }
        yield from self._decode_loop(
            logits, cache, step_inputs, result, max_new_tokens, stop, sampling
        )

    def _decode_loop(self, logits, cache, step_inputs, result, max_new_tokens, stop, sampling):
        # Finished rows keep stepping with the pad token, as transformers' generate does.
        pick = TokenPicker(sampling or Sampling())
        pad = self.config.text.pad_token_id or 0
        done = np.zeros(len(result.token_ids), bool)
        tokens, steps, start = pick(logits), 0, time.perf_counter()
        for step in range(max_new_tokens):
            tokens = np.where(done, pad, tokens)
            for row in np.flatnonzero(~done):
                result.token_ids[row].append(int(tokens[row]))
            yield np.where(done, -1, tokens)
            done |= np.isin(tokens, list(stop))
            if done.all() or step == max_new_tokens - 1:
                break
            step_inputs["position_ids"] += 1
            feed = {"input_ids": tokens[:, None], "attention_mask": cache.mask}
            out = self.decode.infer(
                {**step_inputs, **feed, "past_key": cache.k, "past_value": cache.v}
            )
            result.cache_bytes_per_step = cache.append(out["new_key"], out["new_value"])
            logits = self.store.host(out["logits"][:, -1])
            if result.prefill_logits is not None:
                result.step_logits.append(logits)
            tokens, steps = pick(logits), steps + 1
        result.timings.update(decode_s=time.perf_counter() - start, decode_steps=steps)

    def _prompt_feed(
        self, prompts: list[list[int]], images: Images | None
    ) -> dict[str, np.ndarray]:
        """Left-pads the prompts and derives positions, the cross-attention mask and the
        logit positions (the last one: every row's last token is at S - 1)."""
        s = max(len(p) for p in prompts)
        ids = np.full((len(prompts), s), self.config.text.pad_token_id or 0, np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, s - len(prompt) :], mask[row, s - len(prompt) :] = prompt, 1
        positions = np.where(mask != 0, mask.cumsum(1) - 1, 1)
        tiles = images.num_tiles if images is not None else [[] for _ in prompts]
        v = self.config.vision
        xmask = cross_attention_mask_from_ids(
            ids.tolist(), tiles, self.config.image_token_id, v.max_num_tiles
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

    def _check_request(self, prompts, images: Images | None, max_new_tokens: int) -> None:
        lim, rows = self.limits, self.config.text.embedding_rows
        problems = []
        if not prompts or len(prompts) > lim.max_batch:
            problems.append(f"a batch of {len(prompts)} prompts (built for 1..{lim.max_batch})")
        if any(len(p) == 0 for p in prompts):
            problems.append("an empty prompt (at least one token is needed)")
        if max_new_tokens < 1:
            problems.append(f"max_new_tokens {max_new_tokens} (must be at least 1)")
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens > lim.max_seq_len:
            problems.append(
                f"a prompt of {longest} tokens plus {max_new_tokens} new tokens "
                f"(built for {lim.max_seq_len} in all; shorten the prompt or max_new_tokens)"
            )
        if any(not 0 <= tok < rows for p in prompts for tok in p):
            problems.append(f"token ids outside 0..{rows - 1}")
        if images is not None and images.pixel_values.shape[1] > lim.max_images:
            problems.append(
                f"{images.pixel_values.shape[1]} images per prompt (built for {lim.max_images})"
            )
        if images is not None and len(images.num_tiles) != len(prompts):
            problems.append(
                f"images for {len(images.num_tiles)} prompts but {len(prompts)} prompts"
            )
        if problems:
            raise MllamaExportError("cannot generate: " + "; ".join(problems))

    def _cross_kv(
        self, images: Images | None, batch: int, timings: dict
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
