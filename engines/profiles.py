"""TensorRT optimization profiles as plain data, derived from the build options and the model.

No TensorRT here: the exporter turns these into Polygraphy profiles and trtexec flags, the
manifest stores them as JSON, and the TensorRT backend picks one per call with
`select_profile`. The scheme (docs/tensorrt.md):

- vision: one profile per (batch bucket x num_images bucket); tiles are fixed by the model
  (every image is padded to max tiles), so batch x images is all that varies.
- prefill: one profile per prompt-length bucket; batch and num_images span their whole range,
  num_logits (the positions whose logits are returned) runs from 1 to the bucket's top, as
  far as TensorRT's tensor-volume cap allows the [batch, num_logits, vocab] logits.
- decode: one profile per (batch bucket x past-length bucket); past_sequence is the cache
  capacity (prompt length + max_new_tokens), num_images spans its whole range.

A bucket is a contiguous range [lo, hi]; consecutive buckets of one dim touch without gaps
or overlaps (the next starts at hi + 1), and the last ends exactly at the build limit.
TensorRT tunes each profile's kernels for its opt shape. A bucketed dim's opt is the top of
its bucket (no call in the bucket is larger than the shape its kernels were chosen for); a
dim that spans its whole range in a profile has no bucket to stand for, so its opt is the
common call (`COMMON`): batch 1, one image, one logit position, a typical prompt. Dims that
several inputs share (batch, sequence, num_images, past_sequence, and image_tokens =
num_images x tiles x patches) take the same value in every input of a profile, because each
input's shapes are read off one table of dim sizes.

`tensor_volume_problems` checks every graph input and output, and every attention score
tensor TensorRT materializes, at every profile's maximum against TensorRT's per-tensor cap
of 2^31 - 1 elements (NVIDIA/TensorRT issues #1948, #3324: "tensor volume exceeds
(2^31)-1"; #4123: lifted for some layers only since 10.x).

This module is Mllama's "profiles" part. What the build's engine stage, its planner and its
"what fits" search use of it today: `ProfileScheme`, `DEFAULT_SCHEME`, `all_profiles`,
`engine_graphs`, `check_text_engine`, `step_tokens`, `tensor_volume_problems` and
`largest_fitting`. The profiles themselves (`ShapeProfile`) and choosing one per call are
any family's: engines/shapes.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mllama_export.errors import MllamaExportError
from mllama_export.graphs import contract
from mllama_export.graphs.choices import TEXT_ENGINES
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.contract import GRAPHS, graph_spec, static_dims

from .shapes import (
    MAX_TENSOR_VOLUME,
    HasLimits,
    Range,
    ShapeProfile,
    VolumeProblem,
    buckets,
    largest_limit,
    logits_range,
    volume_problems,
)


@dataclass(frozen=True)
class ProfileScheme:
    """Where the bucket edges fall. Each dim's edges are first, first*growth, ... below the
    limit, then the limit itself: batch 1 | 2 | 3-4 | 5-8 ..., prompt 1-64 | 65-128 | ...,
    past 1-256 | 257-1024 | ... Fewer, wider buckets build faster; more, narrower ones tune
    closer to each call."""

    batch_first: int = 1
    batch_growth: int = 2
    images_first: int = 1
    images_growth: int = 2
    sequence_first: int = 64  # prefill GEMMs scale with the prompt: double each bucket
    sequence_growth: int = 2
    # Decode's linear layers depend on batch only; the past only sizes the attention, so its
    # buckets can grow faster and keep the profile count down on long contexts.
    past_first: int = 256
    past_growth: int = 4
    # opt of a dim spanning its whole range: the common call (see COMMON)
    typical_prompt: int = 128
    typical_context: int = 1024  # prompt plus new tokens: decode's cache capacity
    # the most new tokens one call of a shared text engine takes: its prefill profiles' top
    # and the chunk longer prompts are prefilled in (step_tokens() lowers it to fit the cap)
    step_tokens: int = 1024

    def __post_init__(self):
        for name in ("batch", "images", "sequence", "past"):
            first, growth = getattr(self, f"{name}_first"), getattr(self, f"{name}_growth")
            if first < 1 or growth < 2:
                raise MllamaExportError(
                    f"profile scheme {name}: first edge {first} and growth {growth} "
                    "(need first >= 1 and growth >= 2)"
                )
        if self.typical_prompt < 1 or self.typical_context < 1 or self.step_tokens < 1:
            raise MllamaExportError(
                "profile scheme: typical prompt and context, and step tokens, must be >= 1"
            )

    def common(self, dim: str) -> int:
        """The opt of `dim` where a profile spans its whole range: the call most made."""
        prompt = {"sequence": "typical_prompt", "new_tokens": "typical_prompt"}
        return COMMON.get(dim) or getattr(self, prompt.get(dim, "typical_context"))


# batch 1, one image, the last position's logits: what a single user's request looks like
COMMON = {"batch": 1, "num_images": 1, "num_logits": 1}
DEFAULT_SCHEME = ProfileScheme()


def graph_profiles(
    graph: str,
    config: MllamaConfig,
    limits: HasLimits,
    scheme: ProfileScheme = DEFAULT_SCHEME,
    text_engine: str = "split",
) -> list[ShapeProfile]:
    """The profiles of one graph's engine, smallest first, covering exactly what `limits`
    promise: batch 1..max_batch, num_images 1..max_images, sequence and past_sequence
    1..max_seq_len (num_logits 1..the new tokens or sequence, capped by TensorRT's tensor
    volume limit on the logits). With `text_engine` "shared" the decode graph's engine also
    serves prefill (`shared_phases`) and there is no prefill engine."""
    check_text_engine(text_engine)
    spec = graph_spec(graph)
    if graph not in engine_graphs(text_engine):
        raise MllamaExportError(
            f"a shared text engine has no {graph} engine: the decode engine serves prefill"
        )
    for name in ("max_batch", "max_seq_len", "max_images"):
        if getattr(limits, name) < 1:
            raise MllamaExportError(f"cannot make profiles for {name} {getattr(limits, name)}")
    fixed = static_dims(config)
    per_image = config.vision.max_num_tiles * config.vision.num_patches
    profiles = []
    for index, (phase, cell, whole) in enumerate(_grid(graph, config, limits, scheme, text_engine)):
        ranges: dict[str, Range] = {
            d: _range(d, lo, hi, whole[d], scheme) for d, (lo, hi) in cell.items()
        }
        if "num_logits" in spec.dims:
            ranges["num_logits"] = logits_range(ranges, fixed["vocab"])
        if "total_sequence" in spec.dims:
            past, new = ranges["past_sequence"], ranges["new_tokens"]
            ranges["total_sequence"] = tuple(p + n for p, n in zip(past, new, strict=True))
        lo, opt, hi = ranges["num_images"]
        ranges["image_tokens"] = (lo * per_image, opt * per_image, hi * per_image)
        profiles.append(
            ShapeProfile.from_ranges(
                graph, index, ranges, spec.inputs, fixed, phase, contract.DYNAMIC_DIMS
            )
        )
    return profiles


def check_text_engine(text_engine: str) -> None:
    if text_engine not in TEXT_ENGINES:
        raise MllamaExportError(
            f"unknown text engine {text_engine!r}; expected one of {', '.join(TEXT_ENGINES)}"
        )


def engine_graphs(text_engine: str = "split") -> tuple[str, ...]:
    """The graphs that get a TensorRT engine: all three, or vision and the shared step."""
    check_text_engine(text_engine)
    shared = text_engine == "shared"
    return tuple(name for name, g in GRAPHS.items() if not (shared and g.shared_engine))


def step_tokens(config: MllamaConfig, limits: HasLimits, scheme: ProfileScheme = DEFAULT_SCHEME):
    """The most new tokens one call of a shared text engine takes (its prefill profiles' top,
    the chunk its runner prefills longer prompts in): scheme.step_tokens, at most
    max_seq_len, lowered until a chunk's materialized attention scores
    [max_batch, H_kv, G*N, max_seq_len + N] fit TensorRT's tensor cap."""
    b, s, heads = limits.max_batch, limits.max_seq_len, config.text.num_heads
    lo, hi = 1, max(1, min(scheme.step_tokens, s))  # lo fits or nothing does; largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b * heads * mid * (s + mid) <= MAX_TENSOR_VOLUME:
            lo = mid
        else:
            hi = mid - 1
    return lo


Cell = tuple[str, dict[str, tuple[int, int]], dict[str, tuple[int, int]]]


def _grid(graph: str, config, limits: HasLimits, s: ProfileScheme, text_engine: str) -> list[Cell]:
    """(phase, one bucket range per dim, each dim's whole range) per profile."""
    whole = {
        "batch": (1, limits.max_batch),
        "num_images": (1, limits.max_images),
        "sequence": (1, limits.max_seq_len),
        "past_sequence": (1, limits.max_seq_len),
        "new_tokens": (1, 1),
    }
    batch = buckets(limits.max_batch, s.batch_first, s.batch_growth)
    images = buckets(limits.max_images, s.images_first, s.images_growth)
    if graph == "vision":
        return [("vision", {"batch": b, "num_images": n}, whole) for b in batch for n in images]
    spanning = {"batch": whole["batch"], "num_images": whole["num_images"]}
    if graph == "prefill":
        seq = buckets(limits.max_seq_len, s.sequence_first, s.sequence_growth)
        return [("prefill", {**spanning, "sequence": q}, whole) for q in seq]
    past = buckets(limits.max_seq_len, s.past_first, s.past_growth)
    if text_engine == "split":
        return [
            ("decode", {"batch": b, "num_images": whole["num_images"], "past_sequence": p,
                        "new_tokens": (1, 1)}, whole)
            for b in batch for p in past
        ]  # fmt: skip
    return _shared_phases(limits, s, step_tokens(config, limits, s), batch, past, whole)


def _shared_phases(limits, s: ProfileScheme, top: int, batch, past, whole) -> list[Cell]:
    """A shared text engine's profiles, one phase after the other, partitioning the calls:

    - prefill: the whole prompt (new_tokens 1..top, in the prompt buckets) against one masked
      past slot; batch and images span their range, as the prefill engine's do;
    - decode: one new token, per batch bucket x past bucket (past from 2: a decode step's
      cache holds the prompt and the token, so a past of 1 is always prefill's);
    - chunk: 2..top new tokens against the cache buffer, per past bucket (chunked prefill,
      and prompts longer than `top`)."""
    spanning = {"batch": whole["batch"], "num_images": whole["num_images"]}
    from_two = [(max(2, lo), hi) for lo, hi in past if hi >= 2]
    phased = {**whole, "past_sequence": (2, limits.max_seq_len), "new_tokens": (1, top)}
    prefill = [
        ("prefill", {**spanning, "past_sequence": (1, 1), "new_tokens": q}, phased)
        for q in buckets(top, s.sequence_first, s.sequence_growth)
    ]
    decode = [
        ("decode", {"batch": b, "num_images": whole["num_images"], "past_sequence": p,
                    "new_tokens": (1, 1)}, phased)
        for b in batch for p in from_two
    ]  # fmt: skip
    chunk = [
        ("chunk", {**spanning, "past_sequence": p, "new_tokens": (2, top)}, phased)
        for p in from_two
        if top >= 2
    ]
    return prefill + decode + chunk


def _range(dim: str, lo: int, hi: int, whole: tuple[int, int], scheme: ProfileScheme) -> Range:
    """(min, opt, max): opt at the bucket's top, or at the common call when the profile spans
    the dim's whole range (no bucket to stand for; TensorRT tunes for opt)."""
    if (lo, hi) == whole and lo < hi:
        return (lo, min(max(scheme.common(dim), lo), hi), hi)
    return (lo, hi, hi)


def all_profiles(
    config: MllamaConfig,
    limits: HasLimits,
    scheme: ProfileScheme = DEFAULT_SCHEME,
    text_engine: str = "split",
) -> dict[str, list[ShapeProfile]]:
    """The profiles of every engine (engine_graphs: a shared text engine has no prefill)."""
    return {
        g: graph_profiles(g, config, limits, scheme, text_engine)
        for g in engine_graphs(text_engine)
    }


# which build limit lowers which dim
LIMIT_OF_DIM = {
    "batch": "max_batch",
    "num_images": "max_images",
    "image_tokens": "max_images",
    "sequence": "max_seq_len",
    "num_logits": "max_seq_len",
    "past_sequence": "max_seq_len",
    "new_tokens": "max_seq_len",
    "total_sequence": "max_seq_len",
}


def materialized_scores(
    graph: str, sizes: Mapping[str, int], config: MllamaConfig
) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Attention score tensors the engine holds whole: {name: (shape, dims it grows with)}.

    Only the decode (step) graph's self-attention: its softmax spans the cached and the new
    tokens' scores, which is not the pattern TensorRT fuses; [B, H_kv, G*N, T + N] float32
    (one row per head and new token). Every other attention is written in the documented
    fusable form (graphs/layers.py grouped_attention), whose scores are never materialized
    when fused; exporter/plan.py reports what they would take if not."""
    if graph != "decode":
        return {}
    t = config.text
    new = sizes.get("new_tokens", 1)
    shape = (
        sizes["batch"],
        t.num_kv_heads,
        t.num_heads // t.num_kv_heads * new,
        sizes["past_sequence"] + new,
    )
    return {"self-attention scores": (shape, ("batch", "past_sequence", "new_tokens"))}


def tensor_shapes(
    profile: ShapeProfile, config: MllamaConfig
) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every input and output of the profile's graph, and its materialized score tensors, at
    the profile's maximum: {name: (shape, dynamic dims it uses)}."""
    per_image = config.vision.max_num_tiles * config.vision.num_patches
    sizes = {**static_dims(config), **{d: r[2] for d, r in profile.ranges.items()}}
    sizes.setdefault("image_tokens", sizes["num_images"] * per_image)
    specs = (*GRAPHS[profile.graph].inputs, *GRAPHS[profile.graph].outputs)
    shapes = {
        s.name: (s.shape(sizes), tuple(d for d in s.dims if d in contract.DYNAMIC_DIMS))
        for s in specs
    }
    return {**shapes, **materialized_scores(profile.graph, sizes, config)}


def tensor_volume_problems(
    config: MllamaConfig,
    limits: HasLimits,
    scheme: ProfileScheme = DEFAULT_SCHEME,
    text_engine: str = "split",
) -> list[VolumeProblem]:
    """Every tensor over MAX_TENSOR_VOLUME at some profile's maximum, the largest first."""
    return volume_problems(
        all_profiles(config, limits, scheme, text_engine),
        lambda p: tensor_shapes(p, config),
        lambda dims: tuple(dict.fromkeys(LIMIT_OF_DIM[d] for d in dims)),
    )


def largest_fitting(
    config: MllamaConfig,
    limits: HasLimits,
    name: str,
    scheme: ProfileScheme = DEFAULT_SCHEME,
    text_engine: str = "split",
) -> int | None:
    """The largest value of the limit `name` (the others kept) at which no tensor exceeds
    the cap; None when even 1 does not fit."""
    return largest_limit(
        limits, name, lambda lim: tensor_volume_problems(config, lim, scheme, text_engine)
    )
