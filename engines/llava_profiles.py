"""LLaVA's TensorRT optimization profiles as plain data: the family's "profiles" part.

The scheme follows Mllama's (engines/profiles.py: contiguous buckets, opt at a bucket's top
or at the common call where a profile spans a dim's whole range, every tensor checked against
TensorRT's per-tensor cap), with LLaVA's dims:

- vision: one profile per bucket of `num_tiles`, the tiles of every image of a call: one per
  LLaVA 1.5 image, 1 + grid tiles per LLaVA-NeXT image (up to the largest pinpoint grid).
  The buckets hold whole images' worth: one image's tiles, two images', four, ... up to
  max_batch x max_images images.
- prefill: one profile per bucket of `sequence`, whose edges account for the image tokens a
  prompt carries (576 per LLaVA 1.5 image at 336 px, up to ~2,900 per LLaVA-NeXT image):
  text-only prompts in buckets of sequence_first, doubling, below one image's tokens; then
  prompts with 1, 2, 4, ... images, each bucket topped at that many of the largest images
  plus `image_text` tokens of text; then doubling to max_seq_len. batch, num_tiles and
  num_logits span their whole range (opt: one row, one image's tiles, one logit position).
- decode: one profile per (batch bucket x past_sequence bucket), as Mllama's.

`num_tiles` starts at 1 in prefill: TensorRT is never given an empty feature table, so a
text-only prompt's prefill takes one tile of zeros that its image_layout never names.
LLaVA's decode graph takes one token per call, so there is no shared text engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.choices import TEXT_ENGINES
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_contract import DYNAMIC_DIMS, GRAPHS, static_dims
from mllama_export.graphs.llava_layout import image_tiles, image_token_count

from .shapes import (
    HasLimits,
    Range,
    ShapeProfile,
    VolumeProblem,
    buckets,
    largest_limit,
    logits_range,
    volume_problems,
)

__all__ = [
    "DEFAULT_SCHEME",
    "LlavaProfileScheme",
    "ShapeProfile",
    "all_profiles",
    "engine_graphs",
    "graph_profiles",
    "largest_fitting",
    "sequence_buckets",
    "tensor_shapes",
    "tensor_volume_problems",
]


@dataclass(frozen=True)
class LlavaProfileScheme:
    """Where the bucket edges fall (see the module's docstring)."""

    batch_first: int = 1
    batch_growth: int = 2
    images_growth: int = 2  # vision tiles and prefill image buckets: 1, 2, 4, ... images
    sequence_first: int = 64  # text-only prompts: 1-64 | 65-128 | ... below one image
    sequence_growth: int = 2
    image_text: int = 128  # text tokens beside the images at an image bucket's top
    past_first: int = 256
    past_growth: int = 4

    def __post_init__(self):
        for name in ("batch", "images", "sequence", "past"):
            first = getattr(self, f"{name}_first", 1)
            growth = getattr(self, f"{name}_growth")
            if first < 1 or growth < 2:
                raise MllamaExportError(
                    f"profile scheme {name}: first edge {first} and growth {growth} "
                    "(need first >= 1 and growth >= 2)"
                )
        if self.image_text < 1:
            raise MllamaExportError(f"profile scheme image_text {self.image_text}: need >= 1")


DEFAULT_SCHEME = LlavaProfileScheme()
COMMON = {"batch": 1, "num_logits": 1}  # one user's request, the last position's logits


def max_image_tiles(config: LlavaConfig) -> int:
    """Tiles of the largest image: 1 (LLaVA 1.5), or 1 + the largest pinpoint's grid."""
    return max((image_tiles(config, p) for p in config.image_grid_pinpoints), default=1)


def max_image_tokens(config: LlavaConfig) -> int:
    """Prompt tokens of the largest image: an image of a pinpoint's own shape is not unpadded,
    so the largest over the pinpoints is the largest of all (LLaVA 1.5: one tile's)."""
    sizes = config.image_grid_pinpoints or ((config.vision.image_size,) * 2,)
    return max(image_token_count(config, tuple(p)) for p in sizes)


def check_text_engine(text_engine: str) -> None:
    if text_engine not in TEXT_ENGINES:
        raise MllamaExportError(
            f"unknown text engine {text_engine!r}; expected one of {', '.join(TEXT_ENGINES)}"
        )
    if text_engine != "split":
        raise MllamaExportError(
            f"LLaVA has no {text_engine} text engine: its decode graph takes one token per "
            "call and cannot serve prefill; expected --text-engine split"
        )


def engine_graphs(text_engine: str = "split") -> tuple[str, ...]:
    """The graphs that get a TensorRT engine: all three (no shared text engine)."""
    check_text_engine(text_engine)
    return tuple(GRAPHS)


def sequence_buckets(
    config: LlavaConfig, limits: HasLimits, scheme: LlavaProfileScheme = DEFAULT_SCHEME
) -> list[tuple[int, int]]:
    """Contiguous prompt-length buckets over 1..max_seq_len (see the module's docstring)."""
    s, per_image = scheme, max_image_tokens(config)
    edges = [e for e in _powers(s.sequence_first, s.sequence_growth) if e < per_image]
    images = [n for n in _powers(1, s.images_growth) if n <= limits.max_images]
    edges += [n * per_image + s.image_text for n in images]
    while edges[-1] < limits.max_seq_len:
        edges.append(edges[-1] * s.sequence_growth)
    edges = [e for e in edges if e < limits.max_seq_len] + [limits.max_seq_len]
    return [(lo + 1, hi) for lo, hi in zip([0, *edges[:-1]], edges, strict=True)]


def _powers(first: int, growth: int, below: int = 1 << 40):
    edge = first
    while edge < below:
        yield edge
        edge *= growth


def _check_limits(limits: HasLimits) -> None:
    for name in ("max_batch", "max_seq_len", "max_images"):
        if getattr(limits, name) < 1:
            raise MllamaExportError(f"cannot make profiles for {name} {getattr(limits, name)}")


def graph_profiles(
    graph: str,
    config: LlavaConfig,
    limits: HasLimits,
    scheme: LlavaProfileScheme = DEFAULT_SCHEME,
    text_engine: str = "split",
) -> list[ShapeProfile]:
    """The profiles of one graph's engine, smallest first, covering exactly what `limits`
    promise: batch 1..max_batch, num_tiles 1..max_batch x max_images x the largest image's
    tiles, sequence and past_sequence 1..max_seq_len."""
    check_text_engine(text_engine)
    if graph not in GRAPHS:
        raise MllamaExportError(f"unknown graph {graph!r}; expected one of {', '.join(GRAPHS)}")
    _check_limits(limits)
    spec, fixed = GRAPHS[graph], static_dims(config)
    profiles = []
    for index, cell in enumerate(_cells(graph, config, limits, scheme)):
        ranges = dict(cell)
        if "num_logits" in spec.dims:
            ranges["num_logits"] = logits_range(ranges, fixed["vocab"])
        profiles.append(
            ShapeProfile.from_ranges(graph, index, ranges, spec.inputs, fixed, graph, DYNAMIC_DIMS)
        )
    return profiles


def _cells(graph: str, config, limits: HasLimits, s: LlavaProfileScheme) -> list[dict]:
    """One {dim: (min, opt, max)} per profile of the graph."""
    per_image = max_image_tiles(config)
    most_tiles = limits.max_batch * limits.max_images * per_image
    tiles = buckets(most_tiles, per_image, s.images_growth)
    if graph == "vision":
        return [{"num_tiles": (lo, hi, hi)} for lo, hi in tiles]
    batch = (1, COMMON["batch"], limits.max_batch)
    if graph == "prefill":
        spanning = {"batch": batch, "num_tiles": _whole(1, per_image, most_tiles)}
        return [
            {**spanning, "sequence": _bucket(q, (1, limits.max_seq_len), limits.max_seq_len)}
            for q in sequence_buckets(config, limits, s)
        ]
    common_past = max_image_tokens(config) + s.image_text  # one image and a short prompt
    return [
        {"batch": _bucket(b, (1, limits.max_batch), 1),
         "past_sequence": _bucket(p, (1, limits.max_seq_len), common_past)}
        for b in buckets(limits.max_batch, s.batch_first, s.batch_growth)
        for p in buckets(limits.max_seq_len, s.past_first, s.past_growth)
    ]  # fmt: skip


def _whole(lo: int, common: int, hi: int) -> Range:
    return (lo, min(max(common, lo), hi), hi)


def _bucket(bucket: tuple[int, int], whole: tuple[int, int], common: int) -> Range:
    """opt at the bucket's top, or at the common call where it is the dim's whole range."""
    lo, hi = bucket
    return _whole(lo, common, hi) if bucket == whole and lo < hi else (lo, hi, hi)


def all_profiles(
    config: LlavaConfig,
    limits: HasLimits,
    scheme: LlavaProfileScheme = DEFAULT_SCHEME,
    text_engine: str = "split",
) -> dict[str, list[ShapeProfile]]:
    return {
        g: graph_profiles(g, config, limits, scheme, text_engine)
        for g in engine_graphs(text_engine)
    }


LIMIT_OF_DIM = {
    "batch": "max_batch",
    "num_tiles": "max_images",
    "sequence": "max_seq_len",
    "num_logits": "max_seq_len",
    "past_sequence": "max_seq_len",
}


def materialized(graph: str, sizes: Mapping[str, int], config: LlavaConfig) -> dict:
    """Tensors the engine holds whole besides its inputs and outputs: {name: (shape, dims)}.

    The decode step's self-attention scores [B, H_kv, G, T + 1] (its softmax spans the cache
    and the new token: not the fusable pattern), and the prefill's attention mask repeated
    over the query heads of a KV head, [B, 1, G x S, S] (graphs/layers.py grouped_attention).
    The score tensors of the vision and prefill attention are written in the fusable form."""
    t = config.text
    group = t.num_heads // t.num_kv_heads
    if graph == "decode":
        shape = (sizes["batch"], t.num_kv_heads, group, sizes["past_sequence"] + 1)
        return {"self-attention scores": (shape, ("batch", "past_sequence"))}
    if graph == "prefill":
        b, s = sizes["batch"], sizes["sequence"]
        return {"prefill attention mask": ((b, 1, group * s, s), ("batch", "sequence"))}
    return {}


def tensor_shapes(profile: ShapeProfile, config: LlavaConfig) -> dict:
    """Every input and output of the profile's graph and its materialized tensors, at the
    profile's maximum: {name: (shape, dynamic dims it uses)}."""
    sizes = {**static_dims(config), **{d: r[2] for d, r in profile.ranges.items()}}
    specs = (*GRAPHS[profile.graph].inputs, *GRAPHS[profile.graph].outputs)
    shapes = {
        s.name: (s.shape(sizes), tuple(d for d in s.dims if d in DYNAMIC_DIMS)) for s in specs
    }
    return {**shapes, **materialized(profile.graph, sizes, config)}


def tensor_volume_problems(
    config: LlavaConfig,
    limits: HasLimits,
    scheme: LlavaProfileScheme = DEFAULT_SCHEME,
    text_engine: str = "split",
) -> list[VolumeProblem]:
    """Every tensor over MAX_TENSOR_VOLUME at some profile's maximum, the largest first."""
    return volume_problems(
        all_profiles(config, limits, scheme, text_engine),
        lambda p: tensor_shapes(p, config),
        _lowers,
    )


def _lowers(dims: tuple[str, ...]) -> tuple[str, ...]:
    """The build limits whose lowering shrinks a tensor of ``dims``."""
    lowers = tuple(dict.fromkeys(LIMIT_OF_DIM[d] for d in dims))
    if "num_tiles" in dims:  # tiles per call grow with the batch too
        lowers = tuple(dict.fromkeys(("max_batch", *lowers)))
    return lowers


def largest_fitting(
    config: LlavaConfig,
    limits: HasLimits,
    name: str,
    scheme: LlavaProfileScheme = DEFAULT_SCHEME,
    text_engine: str = "split",
) -> int | None:
    """The largest value of the limit `name` (the others kept) at which no tensor exceeds
    the cap; None when even 1 does not fit."""
    return largest_limit(
        limits, name, lambda lim: tensor_volume_problems(config, lim, scheme, text_engine)
    )
