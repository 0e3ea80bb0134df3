"""Chains vision -> prefill -> decode steps over any backend to turn prompts into tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig

from .backend import Backend
from .sampling import Sampling, TokenPicker
from .text import cross_attention_mask_from_ids


@dataclass(frozen=True)
class Images:
    """Preprocessed images of a batch, padded to the most images any prompt has."""

    pixel_values: np.ndarray  # [B, I, T, C, H, W]
    aspect_ratio_ids: np.ndarray  # [B, I]
    aspect_ratio_mask: np.ndarray  # [B, I, T]
    num_tiles: list[list[int]]  # real tiles of each real image, per prompt


@dataclass(frozen=True)
class Limits:
    """What the graphs or engines were built for; calls outside these are refused."""

    max_batch: int
    max_seq_len: int  # prompt plus generated tokens
    max_images: int


@dataclass
class Generation:
    token_ids: list[list[int]]  # generated tokens per prompt, up to and including a stop token
    prefill_logits: np.ndarray | None = None  # [B, S, V] when asked for
    step_logits: list[np.ndarray] = field(default_factory=list)  # [B, V] per step when asked for
    timings: dict[str, float] = field(default_factory=dict)
    cache_bytes_per_step: int = 0  # bytes the runner copied into its buffers per decode step


class _Cache:
    """Self-attention K/V in buffers sized once per generation; each step fills one slot."""

    def __init__(self, present_k: np.ndarray, present_v: np.ndarray, mask: np.ndarray, cap: int):
        layers, b, heads, s, dim = present_k.shape
        self.k = np.zeros((layers, b, heads, cap, dim), present_k.dtype)
        self.v = np.zeros_like(self.k)
        self.mask = np.zeros((b, cap), np.int64)
        self.k[:, :, :, :s], self.v[:, :, :, :s], self.mask[:, :s] = present_k, present_v, mask
        self.length = s

    def append(self, new_k: np.ndarray, new_v: np.ndarray) -> int:
        # new_k, new_v: [L, B, H_kv, 1, Dh]
        self.k[:, :, :, self.length] = new_k[:, :, :, 0]
        self.v[:, :, :, self.length] = new_v[:, :, :, 0]
        self.mask[:, self.length] = 1
        self.length += 1
        return new_k.nbytes + new_v.nbytes + self.mask.shape[0] * self.mask.itemsize


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
        self.config, self.limits, self.dtype = config, limits, np.dtype(model_dtype)
        self.vision, self.prefill, self.decode = vision, prefill, decode

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
        t = self.config.text
        stop = set(t.eos_token_ids) if stop_tokens is None else set(stop_tokens)
        self._check_request(prompts, images, max_new_tokens)
        timings: dict[str, float] = {}
        feed = self._prompt_feed(prompts, images)
        xk, xv = self._cross_kv(images, len(prompts), timings)
        start = time.perf_counter()
        out = self.prefill.infer({**feed, "cross_key": xk, "cross_value": xv})
        timings["prefill_s"] = time.perf_counter() - start
        capacity = feed["input_ids"].shape[1] + max_new_tokens
        cache = _Cache(out["present_key"], out["present_value"], feed["attention_mask"], capacity)
        result = Generation([[] for _ in prompts], timings=timings)
        if keep_logits:
            result.prefill_logits = out["logits"]
        step_inputs = {
            "position_ids": feed["position_ids"][:, -1:].copy(),
            "cross_attention_mask": feed["cross_attention_mask"][:, -1:].copy(),
            "cross_key": xk,
            "cross_value": xv,
        }
        self._decode_loop(
            out["logits"][:, -1], cache, step_inputs, result, max_new_tokens, stop, sampling
        )
        return result

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
            done |= np.isin(tokens, list(stop))
            if done.all() or step == max_new_tokens - 1:
                break
            step_inputs["position_ids"] += 1
            feed = {"input_ids": tokens[:, None], "attention_mask": cache.mask}
            out = self.decode.infer(
                {**step_inputs, **feed, "past_key": cache.k, "past_value": cache.v}
            )
            result.cache_bytes_per_step = cache.append(out["new_key"], out["new_value"])
            if result.prefill_logits is not None:
                result.step_logits.append(out["logits"][:, -1])
            tokens, steps = pick(out["logits"][:, -1]), steps + 1
        result.timings.update(decode_s=time.perf_counter() - start, decode_steps=steps)

    def _prompt_feed(
        self, prompts: list[list[int]], images: Images | None
    ) -> dict[str, np.ndarray]:
        """Left-pads the prompts and derives positions and the cross-attention mask."""
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
        num_images = 0 if images is None else images.pixel_values.shape[1]
        if xmask.shape[2] < num_images:
            xmask = np.pad(xmask, ((0, 0), (0, 0), (0, num_images - xmask.shape[2]), (0, 0)))
        return {
            "input_ids": ids,
            "position_ids": positions,
            "attention_mask": mask,
            "cross_attention_mask": xmask,
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
            # No image anywhere in the batch: zero image tokens; cross-attention layers then
            # act as the identity under both mask semantics.
            t = self.config.text
            shape = (len(t.cross_attention_layers), batch, t.num_kv_heads, 0, t.head_dim)
            return np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)
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
