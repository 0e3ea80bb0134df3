"""Mllama's "session" part: one generation over the vision, prefill and step graphs.

The generic runner (engines/runner.py) owns what every family shares: the request checks of
the input processor, sampling, stop tokens, forced tokens, step logits, timings and text. It
reaches the graphs only through a session, whose API is small enough that a one-graph family
without a cache implements it in a few lines (tests/test_runner_session.py):

    session = Session(config, backends, limits, store, dtype)
        backends: graph name -> Backend (None where the artifacts have no engine for it);
        store: where the session keeps its buffers (engines/store.py); dtype: the graphs'
        floating-point numpy dtype.
    session.start(prompts, images, max_new_tokens, keep_logits, prefill_chunk, result)
        -> the logits of every prompt's last position [B, V] on the host. Runs the prompt
        (left-padded) through the graphs; refuses a prefill_chunk it cannot honour before any
        work. With keep_logits it fills result.prefill_logits [B, S, V] and
        result.prompt_mask [B, S]; it may record timings in result.timings (prefill_s:
        the prompt's time, when start does more than the prompt) and
        result.cache_bytes_per_step.
    session.step(tokens [B] int64) -> the logits of those tokens [B, V] on the host: the next
        position of every row.

Optional class attributes the artifact loader reads (engines/artifacts.py), each with a
default that serves a family whose manifest records exactly its contract's graphs:
    graph_specs(manifest) -> {graph: (inputs, outputs)}: the specs the backends check feeds
        against (Mllama: an older decode graph's, as its manifest recorded them);
    opened(manifest, backends) -> backends: wraps the opened backends (Mllama: an older
        one-token decode graph behind the step graph's contract);
    derived_dims(config) -> {dim: (input dim, factor)}: output dims no input carries, for
        backends that allocate outputs themselves (image_tokens = num_images x tiles x patches).

Mllama's generation: the vision graph turns the images into cross-attention K/V once; the
prompt then fills the self-attention KV cache (engines/steps.py) through the prefill graph,
or through the step graph (a shared text engine, or prefill_chunk), and each step runs the
step graph for one token per row against the cache.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.contract import GRAPHS
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.spec import TensorSpec

from .backend import Backend
from .inputs import prompt_feed
from .preprocess import PreprocessedImages
from .steps import KVCache, OneTokenDecode, chunk_feed, decode_feed, logit_positions, one_slot_feed

Specs = dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]


class MllamaSession:
    """One generation: cross K/V from the vision graph, the prompt into the KV cache, then
    steps (the module docstring gives the API the runner calls)."""

    def __init__(
        self,
        config: MllamaConfig,
        backends: Mapping[str, Backend | None],
        limits: Limits,
        store,
        dtype: np.dtype,
    ):
        self.config, self.limits, self.store, self.dtype = config, limits, store, dtype
        self.vision, self.prefill = backends["vision"], backends.get("prefill")
        self.decode = backends["decode"]

    def max_step_tokens(self) -> int | None:
        """The most new tokens one call of the step backend takes (None: any)."""
        return getattr(self.decode, "max_step_tokens", None)

    def start(
        self,
        prompts: list[list[int]],
        images: PreprocessedImages | None,
        max_new_tokens: int,
        keep_logits: bool,
        prefill_chunk: int | None,
        result,
    ) -> np.ndarray:
        self._check_chunk(prefill_chunk)
        feed = prompt_feed(self.config, prompts, images)
        if keep_logits:  # every position's logits, not only the last one's
            feed["logit_positions"] = logit_positions(feed["input_ids"].shape[1], None)
        xk, xv = self._cross_kv(images, len(prompts), result.timings)
        begin = time.perf_counter()
        capacity = feed["input_ids"].shape[1] + max_new_tokens
        self.cache = KVCache(self.config, len(prompts), capacity, self.store, self.dtype)
        logits = self._prefill(feed, xk, xv, prefill_chunk, result, keep_logits)
        result.timings["prefill_s"] = time.perf_counter() - begin
        self.result = result
        self.step_inputs = {
            "position_ids": feed["position_ids"][:, -1:].copy(),
            "cross_attention_mask": feed["cross_attention_mask"][:, -1:].copy(),
            "cross_key": xk,
            "cross_value": xv,
        }
        return logits

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.step_inputs["position_ids"] += 1
        out = self.decode.infer(decode_feed(tokens, self.cache, self.step_inputs))
        self.result.cache_bytes_per_step = self.cache.write(
            out["new_key"], out["new_value"], np.ones((len(tokens), 1), np.int64)
        )
        return self.store.host(out["logits"][:, -1])

    def _prefill(self, feed, xk, xv, chunk, result, keep) -> np.ndarray:
        """Fills the cache with the prompt; returns the logits of its last position [B, V].

        The prefill graph when there is one and no chunk is asked for; else the step graph:
        the whole prompt against one masked past slot when the step backend takes that many
        new tokens, or chunks (of `chunk`, or of the most the backend takes) against the
        cache, each chunk seeing the slots the earlier ones filled."""
        s, cache = feed["input_ids"].shape[1], self.cache
        limit = self.max_step_tokens()
        if chunk is None and self.prefill is not None:
            out = self.prefill.infer({**feed, "cross_key": xk, "cross_value": xv})
            cache.write(out["present_key"], out["present_value"], feed["attention_mask"])
            pieces = [out["logits"]]
        elif chunk is None and (limit is None or s <= limit):
            out = self.decode.infer(
                one_slot_feed(feed, self.config, self.store, self.dtype, xk, xv)
            )
            cache.write(out["new_key"], out["new_value"], feed["attention_mask"])
            pieces = [out["logits"]]
        else:
            chunk = chunk or limit
            pieces = []
            for a in range(0, s, chunk):
                b = min(a + chunk, s)
                out = self.decode.infer(chunk_feed(feed, a, b, cache, xk, xv, keep))
                cache.write(out["new_key"], out["new_value"], feed["attention_mask"][:, a:b])
                pieces.append(out["logits"])
        result.timings["prefill_calls"] = len(pieces)
        last = self.store.host(pieces[-1][:, -1])  # position S - 1 either way
        if keep:
            result.prefill_logits = np.concatenate([self.store.host(p) for p in pieces], axis=1)
            result.prompt_mask = feed["attention_mask"]
        return last

    def _check_chunk(self, chunk) -> None:
        """prefill_chunk, refused before any work."""
        if chunk is None:
            return
        if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
            raise MllamaExportError(
                f"prefill_chunk {chunk!r}: expected a positive number of prompt tokens"
            )
        limit = self.max_step_tokens()
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

    # -- what the artifact loader asks of the family (engines/artifacts.py) -----------------

    @staticmethod
    def graph_specs(manifest: dict) -> Specs:
        """Each graph's inputs and outputs: the contract's, or for an older decode graph the
        ones its manifest recorded."""
        specs = {name: (g.inputs, g.outputs) for name, g in GRAPHS.items()}
        if legacy_decode(manifest):
            entry = manifest["graphs"]["decode"]
            specs["decode"] = tuple(
                tuple(
                    TensorSpec(t["name"], t["dtype"], tuple(t["dims"]), t.get("doc", ""))
                    for t in ts
                )
                for ts in (entry["inputs"], entry["outputs"])
            )
        return specs

    @staticmethod
    def opened(manifest: dict, backends: dict[str, Backend | None]) -> dict:
        if legacy_decode(manifest):
            backends["decode"] = OneTokenDecode(backends["decode"])
        return backends

    @staticmethod
    def derived_dims(config: MllamaConfig) -> dict[str, tuple[str, int]]:
        v = config.vision
        return {"image_tokens": ("num_images", v.max_num_tiles * v.num_patches)}


def legacy_decode(manifest: dict) -> bool:
    """Artifacts of an mllama-export from before the step graph: a decode graph without
    logit_positions, one token per step (docs/graphs.md)."""
    inputs = manifest["graphs"]["decode"].get("inputs")
    return bool(inputs) and "logit_positions" not in {i["name"] for i in inputs}
