"""Mllama's self-attention cache and the feeds of the step graph (engines/mllama_session.py).

The step graph (graphs/model.py DecodeGraph) takes new tokens against the cache. The session
calls it three ways, all with the same contract:

- a decode step: one token per sequence, the cache buffer as the past;
- a chunk of a prompt (chunked prefill): N prompt tokens, the cache buffer as the past, its
  filled slots those of the earlier chunks;
- a whole prompt against one masked past slot: the prefill of a shared text engine, whose
  prefill profiles take a one-slot past (engines/profiles.py).

In every call the attention mask is the past slots' (1 where a real token is cached) then
the new tokens' (1 real, 0 left padding), so a chunk that holds only padding for some row
is masked like one-shot prefill masks those positions.
"""

from __future__ import annotations

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs import contract
from mllama_export.graphs.config import MllamaConfig

from .backend import check_feed

LAST = np.zeros(1, np.int64)  # logit_positions of a decode step: its one new token


def logit_positions(length: int, last: int | None = 1) -> np.ndarray:
    """The `logit_positions` input asking for the last `last` of `length` positions (every
    position when `last` is None), in order. Left padding ends every row at length - 1, so
    one vector serves the whole batch: [length - 1] when serving, arange(length) to judge."""
    count = length if last is None else last
    if not 1 <= count <= length:
        raise MllamaExportError(
            f"cannot ask for the logits of the last {count} of {length} positions"
        )
    return np.arange(length - count, length, dtype=np.int64)


class KVCache:
    """Self-attention K/V in buffers sized once per generation ([L_s, B, H_kv, cap, Dh]):
    prefill writes the prompt's slots (at once, or chunk by chunk), each decode step one more.

    The buffers live in the step backend's store (host arrays, or device tensors bound by
    pointer), so the past is never copied: not into a new tensor, not across to the host.
    `mask` is [B, cap + 1]: the slots, then a last column of ones for the one new token of a
    decode step, so a step is fed the buffer as it is.
    """

    def __init__(self, config: MllamaConfig, batch: int, capacity: int, store, dtype):
        t = config.text
        shape = (len(t.self_attention_layers), batch, t.num_kv_heads, capacity, t.head_dim)
        self.k, self.v = store.zeros(shape, dtype), store.zeros(shape, dtype)
        self.mask = store.zeros((batch, capacity + 1), np.dtype(np.int64))
        self.mask[:, capacity] = 1
        self.capacity, self.length, self.store = capacity, 0, store
        self.host_mask = np.zeros((batch, capacity), np.int64)  # what the slots hold, on the host

    def write(self, new_k, new_v, valid: np.ndarray) -> int:
        """The K/V of the next tokens ([L_s, B, H_kv, N, Dh], `valid` [B, N]: 1 for a real
        token) into the next slots; returns the bytes written."""
        a, n = self.length, valid.shape[1]
        self.k[:, :, :, a : a + n] = new_k
        self.v[:, :, :, a : a + n] = new_v
        self.mask[:, a : a + n] = self.store.put(np.ascontiguousarray(valid, np.int64))
        self.host_mask[:, a : a + n] = valid
        self.length += n
        return int(new_k.nbytes) + int(new_v.nbytes) + valid.size * 8

    def chunk_mask(self, valid: np.ndarray) -> np.ndarray:
        """attention_mask of a chunk [B, cap + N]: the filled slots, then the chunk's tokens."""
        return np.concatenate((self.host_mask, valid), axis=1)


def chunk_feed(prompt: dict, a: int, b: int, cache: KVCache, xk, xv, keep: bool) -> dict:
    """Prompt positions a..b-1 against the cache (chunked prefill): logits at every position
    of the chunk when `keep`, else at its last one (the last chunk's is the next token's)."""
    part = {
        name: np.ascontiguousarray(prompt[name][:, a:b])
        for name in ("input_ids", "position_ids", "cross_attention_mask")
    }
    return {
        **part,
        "attention_mask": cache.chunk_mask(prompt["attention_mask"][:, a:b]),
        "past_key": cache.k,
        "past_value": cache.v,
        "cross_key": xk,
        "cross_value": xv,
        "logit_positions": logit_positions(b - a, None if keep else 1),
    }


def one_slot_feed(prompt: dict, config: MllamaConfig, store, dtype, xk, xv) -> dict:
    """The whole prompt against one masked past slot: a shared text engine's prefill (its
    prefill profiles take past_sequence 1, since no dim may be 0)."""
    t = config.text
    batch = prompt["input_ids"].shape[0]
    past = store.zeros((len(t.self_attention_layers), batch, t.num_kv_heads, 1, t.head_dim), dtype)
    mask = np.concatenate((np.zeros((batch, 1), np.int64), prompt["attention_mask"]), axis=1)
    return {
        "input_ids": prompt["input_ids"],
        "position_ids": prompt["position_ids"],
        "attention_mask": mask,
        "past_key": past,
        "past_value": past,
        "cross_attention_mask": prompt["cross_attention_mask"],
        "cross_key": xk,
        "cross_value": xv,
        "logit_positions": prompt["logit_positions"],
    }


def decode_feed(tokens: np.ndarray, cache: KVCache, step_inputs: dict) -> dict:
    """One new token per sequence against the cache buffer, passed in place."""
    return {
        **step_inputs,
        "input_ids": tokens[:, None],
        "attention_mask": cache.mask,
        "past_key": cache.k,
        "past_value": cache.v,
        "logit_positions": LAST,
    }


class OneTokenDecode:
    """The decode graph of artifacts built before it took several new tokens, behind the step
    graph's contract: it took one token, no logit_positions, and an attention_mask over the
    cache slots only (the new token always saw itself). Fed one new token, it runs the old
    graph on what it took; more new tokens per call are refused (max_step_tokens is 1)."""

    max_step_tokens = 1

    def __init__(self, backend):
        self.backend, self.name = backend, getattr(backend, "name", type(backend).__name__)
        self.inputs, self.outputs = contract.DECODE_INPUTS, contract.DECODE_OUTPUTS
        self.store = getattr(backend, "store", None)
        self.label = "decode (one token per step, an older mllama-export's)"

    def infer(self, feed: dict) -> dict:
        check_feed(self.label, self.inputs, feed)
        if feed["input_ids"].shape[1] != 1:
            raise MllamaExportError(
                f"{self.label} takes one new token per call, not {feed['input_ids'].shape[1]}; "
                "rebuild the artifacts for chunked prefill"
            )
        slots = feed["past_key"].shape[3]
        old = {name: value for name, value in feed.items() if name != "logit_positions"}
        mask = feed["attention_mask"][:, :slots]
        old["attention_mask"] = (
            mask.contiguous() if hasattr(mask, "contiguous") else np.ascontiguousarray(mask)
        )
        return self.backend.infer(old)
