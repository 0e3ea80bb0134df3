"""LLaVA's "session" part: one generation over the vision, prefill and decode graphs.

The API is the one engines/mllama_session.py documents (start, step; the runner owns
sampling, stop tokens and the rest). LLaVA's generation: the vision graph turns every tile of
the batch into projected features at once; the prefill graph embeds the prompt, splices those
features (and LLaVA-NeXT's newline vector) where `image_layout` (graphs/llava_layout.py
build_image_layout) says, and returns the prompt's KV cache; each step then runs the decode
graph for one token per row against the cache, a buffer sized once per generation. A Mistral
sliding window lives in the decode step's attention mask (decode_attention_mask), which only
the host can build: it knows the new token's slot.

The image features enter the prompt inside the prefill graph, so the prompt cannot go
through the decode graph in chunks: prefill_chunk is refused in one line.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_layout import build_image_layout, decode_attention_mask

from .backend import Backend
from .llava_inputs import image_sizes_of
from .llava_preprocess import LlavaImages
from .llava_text import left_pad


class LlavaCache:
    """K/V of every layer in buffers of [L, B, H_kv, capacity, Dh], in the decode backend's
    store (host arrays, or device tensors bound by pointer), so the past is never copied;
    `filled` [B, capacity] on the host says which slots hold a real token."""

    def __init__(self, config: LlavaConfig, batch: int, capacity: int, store, dtype):
        t = config.text
        shape = (t.num_layers, batch, t.num_kv_heads, capacity, t.head_dim)
        self.k, self.v = store.zeros(shape, dtype), store.zeros(shape, dtype)
        self.filled = np.zeros((batch, capacity), np.int64)
        self.length, self.window = 0, t.sliding_window

    def write(self, new_k, new_v, valid: np.ndarray) -> int:
        """The next tokens' K/V ([L, B, H_kv, N, Dh]; valid [B, N]: 1 for a real token) into
        the next slots; returns the bytes written."""
        a, n = self.length, valid.shape[1]
        self.k[:, :, :, a : a + n] = new_k
        self.v[:, :, :, a : a + n] = new_v
        self.filled[:, a : a + n] = valid
        self.length += n
        return int(new_k.nbytes) + int(new_v.nbytes)

    def step_mask(self) -> np.ndarray:
        """attention_mask of the token about to be written at slot `length` ([B, capacity])."""
        return decode_attention_mask(self.filled, self.length, self.window)


class LlavaSession:
    """One generation: features of every tile, the prompt with them spliced in, then steps
    (engines/mllama_session.py documents the API the runner calls)."""

    def __init__(
        self,
        config: LlavaConfig,
        backends: Mapping[str, Backend | None],
        limits: Limits,
        store,
        dtype: np.dtype,
    ):
        self.config, self.limits, self.store, self.dtype = config, limits, store, dtype
        missing = [g for g in ("vision", "prefill", "decode") if backends.get(g) is None]
        if missing:
            raise MllamaExportError(
                f"LLaVA runs its vision, prefill and decode graphs; no backend for {missing} "
                f"(given: {sorted(g for g, b in backends.items() if b is not None)})"
            )
        self.vision, self.prefill, self.decode = (
            backends[g] for g in ("vision", "prefill", "decode")
        )

    def start(
        self,
        prompts: list[list[int]],
        images: LlavaImages | None,
        max_new_tokens: int,
        keep_logits: bool,
        prefill_chunk: int | None,
        result,
    ) -> np.ndarray:
        if prefill_chunk is not None:
            raise MllamaExportError(
                f"prefill_chunk {prefill_chunk!r}: LLaVA prefills the whole prompt in one call "
                "(its image features are spliced in inside the prefill graph, which the decode "
                "graph cannot do); leave prefill_chunk unset"
            )
        pad = self.config.pad_token_id or self.config.text.pad_token_id or 0
        batch = left_pad(prompts, pad)
        features = self._features(images, result.timings)
        begin = time.perf_counter()
        s = batch["input_ids"].shape[1]
        feed = {
            **batch,
            "image_features": features,
            "image_layout": build_image_layout(
                batch["input_ids"], image_sizes_of(images, len(prompts)), self.config
            ),
            # every position's logits to judge them, else the last one's (rows end at S - 1)
            "logit_positions": np.arange(0 if keep_logits else s - 1, s, dtype=np.int64),
        }
        out = self.prefill.infer(feed)
        self.cache = LlavaCache(
            self.config, len(prompts), s + max_new_tokens, self.store, self.dtype
        )
        self.cache.write(out["present_key"], out["present_value"], batch["attention_mask"])
        logits = self.store.host(out["logits"])
        result.timings.update(prefill_s=time.perf_counter() - begin, prefill_calls=1)
        if keep_logits:
            result.prefill_logits, result.prompt_mask = logits, batch["attention_mask"]
        self.result, self.positions = result, batch["position_ids"][:, -1:].copy()
        return logits[:, -1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.positions += 1
        feed = {
            "input_ids": np.asarray(tokens, np.int64)[:, None],
            "position_ids": self.positions,
            "attention_mask": self.cache.step_mask(),
            "past_key": self.cache.k,
            "past_value": self.cache.v,
        }
        out = self.decode.infer(feed)
        self.result.cache_bytes_per_step = (
            self.cache.write(out["new_key"], out["new_value"], np.ones((len(tokens), 1), np.int64))
            + feed["attention_mask"].nbytes
        )
        return self.store.host(out["logits"][:, -1])

    def _features(self, images: LlavaImages | None, timings: dict):
        """Every tile's projected features [N, P, D]; without a tile, one zero tile that no
        layout names (no dim of a graph is ever 0, which engines with profiles refuse)."""
        if images is None or len(images.pixel_values) == 0:
            shape = (1, self.config.tile_tokens, self.config.text.hidden_size)
            return self.store.zeros(shape, self.dtype)
        start = time.perf_counter()
        pixels = np.asarray(images.pixel_values).astype(self.dtype, copy=False)
        out = self.vision.infer({"pixel_values": pixels})
        timings["vision_s"] = time.perf_counter() - start
        return out["image_features"]
