"""Optimization profiles as data: exact coverage, shared dims, selection at every edge."""

from __future__ import annotations

import itertools
import json

import pytest

from mllama_export.engines.profiles import (
    MAX_TENSOR_VOLUME,
    ProfileScheme,
    ShapeProfile,
    all_profiles,
    buckets,
    graph_profiles,
    largest_fitting,
    step_tokens,
    tensor_shapes,
    tensor_volume_problems,
)
from mllama_export.engines.runner import Limits
from mllama_export.engines.shapes import coverage, select_profile
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import preset
from mllama_export.graphs.contract import GRAPHS, static_dims

TINY = preset("tiny")
PER_IMAGE = TINY.vision.max_num_tiles * TINY.vision.num_patches
LIMITS = [
    Limits(1, 2, 1),
    Limits(4, 512, 2),
    Limits(3, 100, 3),
    Limits(5, 65, 1),
    Limits(8, 1000, 2),
]
# the dims each graph's profiles bucket; the others span their whole range in every profile
BUCKETED = {
    "vision": ("batch", "num_images"),
    "prefill": ("sequence",),
    "decode": ("batch", "past_sequence"),
}
LENGTH = {"sequence", "past_sequence"}


def limit_of(limits: Limits, dim: str) -> int:
    return {
        "batch": limits.max_batch,
        "num_images": limits.max_images,
        "sequence": limits.max_seq_len,
        "past_sequence": limits.max_seq_len,
        "new_tokens": 1,  # a split decode engine takes one new token
    }[dim]


def shapes_at(graph: str, point: dict[str, int]) -> dict[str, tuple[int, ...]]:
    sizes = {"num_logits": 1, "new_tokens": 1, **static_dims(TINY), **point}
    sizes["image_tokens"] = point["num_images"] * PER_IMAGE
    sizes["total_sequence"] = sizes.get("past_sequence", 1) + sizes["new_tokens"]
    return {s.name: s.shape(sizes) for s in GRAPHS[graph].inputs}


def base_point(graph: str) -> dict[str, int]:
    point = {"batch": 1, "num_images": 1}
    point.update(
        {"prefill": {"sequence": 1}, "decode": {"past_sequence": 1, "new_tokens": 1}}.get(graph, {})
    )
    return point


def owner(profiles, point) -> list[int]:
    """Indices of the profiles whose ranges hold the point, by the ranges alone."""
    return [
        i
        for i, p in enumerate(profiles)
        if all(lo <= point[d] <= hi for d, (lo, _, hi) in p.ranges.items() if d in point)
    ]


def test_buckets_are_contiguous_and_end_at_the_limit():
    assert buckets(512, 64, 2) == [(1, 64), (65, 128), (129, 256), (257, 512)]
    assert buckets(8192, 256, 4) == [(1, 256), (257, 1024), (1025, 4096), (4097, 8192)]
    assert buckets(4, 1, 2) == [(1, 1), (2, 2), (3, 4)]
    assert buckets(1, 64, 2) == [(1, 1)]
    assert buckets(64, 64, 2) == [(1, 64)]
    assert buckets(65, 64, 2) == [(1, 64), (65, 65)]
    for limit, first, growth in itertools.product(range(1, 70), (1, 3, 64), (2, 3, 4)):
        got = buckets(limit, first, growth)
        assert got[0][0] == 1 and got[-1][1] == limit
        assert all(lo <= hi for lo, hi in got)
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(got))
    with pytest.raises(MllamaExportError, match="limit must be >= 1"):
        buckets(0, 1, 2)


@pytest.mark.parametrize("limits", LIMITS, ids=str)
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_profiles_cover_exactly_the_promised_ranges(graph, limits):
    profiles = graph_profiles(graph, TINY, limits)
    covered = coverage(profiles)
    for dim in ("batch", "num_images", *(d for d in LENGTH if d in covered)):
        assert covered[dim] == (1, limit_of(limits, dim)), dim
    if "image_tokens" in covered:
        assert covered["image_tokens"] == (PER_IMAGE, limits.max_images * PER_IMAGE)
    # each bucketed dim: contiguous buckets, no gaps, no overlaps
    for dim in BUCKETED[graph]:
        ranges = sorted({(p.ranges[dim][0], p.ranges[dim][2]) for p in profiles})
        assert ranges[0][0] == 1 and ranges[-1][1] == limit_of(limits, dim)
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges)), ranges
    # dims not bucketed span their whole range in every profile; num_logits 1..the prompt
    for p in profiles:
        derived = {"image_tokens", "num_logits", "total_sequence"}
        for dim in set(p.ranges) - set(BUCKETED[graph]) - derived:
            assert (p.ranges[dim][0], p.ranges[dim][2]) == (1, limit_of(limits, dim))
        if graph == "prefill":
            assert p.ranges["num_logits"] == (1, 1, p.ranges["sequence"][2])
        if graph == "decode":  # one new token: one logit position, the mask one slot longer
            assert p.ranges["num_logits"] == p.ranges["new_tokens"] == (1, 1, 1)
            assert p.ranges["total_sequence"] == tuple(x + 1 for x in p.ranges["past_sequence"])
    # every point of the promised box belongs to exactly one profile
    axes = {d: range(1, limit_of(limits, d) + 1) for d in BUCKETED[graph]}
    for values in itertools.product(*axes.values()):
        point = {**base_point(graph), **dict(zip(axes, values, strict=True))}
        assert len(owner(profiles, point)) == 1, point


@pytest.mark.parametrize("limits", LIMITS, ids=str)
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_min_opt_max_and_shared_dims_agree_across_inputs(graph, limits):
    fixed = static_dims(TINY)
    for p in graph_profiles(graph, TINY, limits):
        for dim, (lo, opt, hi) in p.ranges.items():
            assert 1 <= lo <= opt <= hi
            if dim in BUCKETED[graph] and (lo, hi) != (1, limit_of(limits, dim)):
                assert opt == hi, dim  # tuned at the top of the bucket
            elif dim in ("batch", "num_images", "num_logits"):
                assert opt == 1, dim  # the common call: one user, one image, one position
        for k in range(3):  # min, opt, max
            seen: dict[str, set[int]] = {}
            for name, dims in p.inputs.items():
                shape = p.shapes[name][k]
                assert len(shape) == len(dims)
                for d, x in zip(dims, shape, strict=True):
                    seen.setdefault(d, set()).add(x)
            for d, values in seen.items():
                assert len(values) == 1, (p.index, k, d, values)
                value = values.pop()
                if d in p.ranges:
                    assert value == p.ranges[d][k]
                else:
                    assert value == fixed[d]
            if "image_tokens" in p.ranges:
                assert p.ranges["image_tokens"][k] == p.ranges["num_images"][k] * PER_IMAGE


def test_the_scheme_for_the_default_build_options():
    limits = Limits(4, 512, 2)
    got = {g: [p.describe() for p in ps] for g, ps in all_profiles(TINY, limits).items()}
    assert len(got["vision"]) == 3 * 2  # batch 1 | 2 | 3-4  x  images 1 | 2
    assert len(got["prefill"]) == 4  # prompt 1-64 | 65-128 | 129-256 | 257-512
    assert len(got["decode"]) == 3 * 2  # batch x past 1-256 | 257-512
    assert got["prefill"][3] == (
        f"batch 1..4, num_images 1..2, image_tokens {PER_IMAGE}..{2 * PER_IMAGE}, "
        "sequence 257..512, num_logits 1..512"
    )
    # 11B at 8k context stays at a handful of profiles per graph
    big = all_profiles(preset("11b"), Limits(4, 8192, 2))
    assert [len(big[g]) for g in ("vision", "prefill", "decode")] == [6, 8, 12]
    assert [p.index for p in big["decode"]] == list(range(12))


@pytest.mark.parametrize("limits", LIMITS, ids=str)
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_selection_at_every_bucket_edge(graph, limits):
    profiles = graph_profiles(graph, TINY, limits)
    for dim in BUCKETED[graph]:
        top = limit_of(limits, dim)
        edges = {e for p in profiles for e in (p.ranges[dim][0], p.ranges[dim][2])}
        for value in sorted({v for e in edges for v in (e - 1, e, e + 1)}):
            for other in itertools.product(
                *(sorted({1, limit_of(limits, d)}) for d in BUCKETED[graph] if d != dim)
            ):
                rest = dict(zip([d for d in BUCKETED[graph] if d != dim], other, strict=True))
                point = {**base_point(graph), **rest, dim: value}
                feed = shapes_at(graph, point)
                if not 1 <= value <= top:
                    with pytest.raises(MllamaExportError, match=f"{dim} {value} outside 1..{top}"):
                        select_profile(profiles, feed)
                    continue
                chosen = select_profile(profiles, feed)
                assert [chosen] == owner(profiles, point), point
                assert profiles[chosen].contains(feed)


def test_whole_range_dims_select_too():
    profiles = graph_profiles("prefill", TINY, Limits(4, 512, 2))
    for images, batch in itertools.product((1, 2), (1, 3, 4)):
        feed = shapes_at("prefill", {"batch": batch, "num_images": images, "sequence": 100})
        assert select_profile(profiles, feed) == 1
    for bad, message in (
        ({"batch": 5}, "batch 5 outside 1..4"),
        ({"num_images": 3}, "num_images 3 outside 1..2"),
        ({"sequence": 513}, "sequence 513 outside 1..512"),
    ):
        point = {"batch": 1, "num_images": 1, "sequence": 10, **bad}
        with pytest.raises(MllamaExportError, match=message) as err:
            select_profile(profiles, shapes_at("prefill", point))
        text = str(err.value)
        assert "\n" not in text
        assert "no prefill optimization profile fits the shapes input_ids" in text
        assert "cover batch 1..4, num_images 1..2" in text and "sequence 1..512" in text


def test_inconsistent_feeds_are_refused_with_the_reason():
    profiles = graph_profiles("decode", TINY, Limits(4, 512, 2))
    good = shapes_at("decode", {"batch": 2, "num_images": 1, "past_sequence": 40})
    assert select_profile(profiles, good) == 2
    cases = [
        ({"input_ids": (3, 1)}, r"batch differs between inputs \(3 in input_ids, 2 in"),
        (
            {"past_key": good["past_key"][:3] + (41,) + good["past_key"][4:]},
            "past_sequence differs between inputs",
        ),
        (
            {"cross_key": good["cross_key"][:3] + (PER_IMAGE + 1,) + good["cross_key"][4:]},
            "image_tokens differs",
        ),
        ({"input_ids": (2, 2)}, r"new_tokens differs between inputs \(2 in input_ids, 1 in"),
        (
            {"attention_mask": (2, 40)},
            r"total_sequence 40 \(attention_mask\) is not past_sequence 40",
        ),
        ({"logit_positions": (2,)}, "num_logits 2 is more than new_tokens 1"),
        ({"input_ids": (2,)}, "inputs input_ids missing, unknown or of the wrong rank"),
    ]
    for change, message in cases:
        with pytest.raises(MllamaExportError, match=message):
            select_profile(profiles, {**good, **change})
    both = {**good}
    for name in ("cross_key", "cross_value"):
        both[name] = good[name][:3] + (PER_IMAGE + 1,) + good[name][4:]
    with pytest.raises(MllamaExportError, match=r"image_tokens 69 is not num_images 1 x 68"):
        select_profile(profiles, both)
    missing = dict(good)
    del missing["past_value"]
    with pytest.raises(MllamaExportError, match="past_value missing"):
        select_profile(profiles, missing)


def test_the_smallest_containing_profile_wins_where_profiles_overlap():
    specs = GRAPHS["prefill"].inputs
    fixed = static_dims(TINY)

    def make(index, lo, hi):
        ranges = {
            "batch": (1, 1, 1),
            "num_images": (1, 1, 1),
            "image_tokens": (PER_IMAGE,) * 3,
            "sequence": (lo, hi, hi),
            "num_logits": (1, 1, hi),
        }
        return ShapeProfile.from_ranges("prefill", index, ranges, specs, fixed)

    wide, narrow = make(0, 1, 512), make(1, 64, 128)
    at = lambda s: shapes_at("prefill", {"batch": 1, "num_images": 1, "sequence": s})  # noqa: E731
    assert select_profile([wide, narrow], at(64)) == 1
    assert select_profile([wide, narrow], at(63)) == 0
    assert select_profile([wide, narrow], at(129)) == 0
    assert select_profile([narrow, wide], at(100)) == 0


def test_json_round_trip_and_trtexec_shapes():
    profiles = all_profiles(TINY, Limits(4, 512, 2))
    for graph, ps in profiles.items():
        for p in ps:
            data = json.loads(json.dumps(p.to_json()))
            assert ShapeProfile.from_json(data) == p
            assert data["graph"] == graph and set(data["inputs"]) == set(p.shapes)
    p = profiles["decode"][5]  # batch 3..4, past 257..512
    shapes = p.trtexec_shapes()
    assert shapes["min"].startswith("input_ids:3x1,position_ids:3x1,attention_mask:3x258,")
    assert "past_key:4x4x2x512x16" in shapes["max"]
    # opt: the top of the batch bucket, one image (num_images spans its whole range)
    assert shapes["opt"].startswith("input_ids:4x1,")
    assert f"cross_key:2x4x2x{PER_IMAGE}x16" in shapes["opt"]
    assert f"cross_key:2x4x2x{2 * PER_IMAGE}x16" in shapes["max"]
    with pytest.raises(MllamaExportError, match="malformed optimization profile"):
        ShapeProfile.from_json({"graph": "decode"})


def test_bad_schemes_and_graphs_are_refused():
    with pytest.raises(MllamaExportError, match="growth 1"):
        ProfileScheme(past_growth=1)
    with pytest.raises(MllamaExportError, match="unknown graph 'text'"):
        graph_profiles("text", TINY, Limits(1, 2, 1))
    with pytest.raises(MllamaExportError, match="max_batch 0"):
        graph_profiles("decode", TINY, Limits(0, 2, 1))
    with pytest.raises(MllamaExportError, match="no optimization profiles"):
        select_profile([], {})


def test_a_coarser_scheme_changes_only_the_edges():
    scheme = ProfileScheme(batch_growth=4, sequence_first=128, past_first=128, past_growth=2)
    profiles = all_profiles(TINY, Limits(8, 512, 2), scheme)
    assert [p.describe().split(", ")[-2] for p in profiles["prefill"]] == [
        "sequence 1..128",
        "sequence 129..256",
        "sequence 257..512",
    ]
    assert sorted({p.ranges["batch"][::2] for p in profiles["decode"]}) == [
        (1, 1),
        (2, 4),
        (5, 8),
    ]


def test_opt_is_the_common_call_where_a_dim_spans_its_whole_range():
    """TensorRT tunes each profile's kernels for opt: a bucket's top where the dim is
    bucketed, the call most made (batch 1, one image, one logit position, a typical prompt)
    where the profile spans the dim's whole range."""
    prefill = graph_profiles("prefill", TINY, Limits(4, 512, 2))
    for p in prefill:
        assert p.ranges["batch"] == (1, 1, 4) and p.ranges["num_images"] == (1, 1, 2)
        assert p.ranges["image_tokens"] == (PER_IMAGE, PER_IMAGE, 2 * PER_IMAGE)
        assert p.ranges["num_logits"][:2] == (1, 1)
        assert p.ranges["sequence"][1] == p.ranges["sequence"][2]
        assert p.shapes["logit_positions"][1] == (1,)
    short = graph_profiles("prefill", TINY, Limits(1, 40, 1))  # one bucket: 1..40 whole
    assert short[0].ranges["sequence"] == (1, 40, 40)  # min(typical 128, 40)
    typical = graph_profiles("prefill", TINY, Limits(1, 300, 1), ProfileScheme(sequence_first=512))
    assert typical[0].ranges["sequence"] == (1, 128, 300)
    decode = graph_profiles("decode", TINY, Limits(2, 200, 2))
    assert [p.ranges["batch"] for p in decode] == [(1, 1, 1), (2, 2, 2)]
    assert all(p.ranges["num_images"] == (1, 1, 2) for p in decode)
    assert all(p.ranges["past_sequence"] == (1, 200, 200) for p in decode)
    with pytest.raises(MllamaExportError, match="typical"):
        ProfileScheme(typical_prompt=0)


def test_logits_positions_stay_under_the_tensor_cap():
    """11B at batch 4 and 8192 tokens: [4, 8192, 128256] logits would be 1.96 x 2^31
    elements; the prefill profiles cap num_logits where [4, n, 128256] still fits."""
    config = preset("11b")
    prefill = graph_profiles("prefill", config, Limits(4, 8192, 2))
    cap = MAX_TENSOR_VOLUME // (4 * config.text.vocab_size)
    assert cap == 4185
    assert prefill[-1].ranges["num_logits"] == (1, 1, cap)
    assert prefill[-1].ranges["sequence"] == (4097, 8192, 8192)
    assert prefill[5].ranges["num_logits"] == (1, 1, 2048)  # 1025..2048 fits whole
    shapes = tensor_shapes(prefill[-1], config)
    assert shapes["logits"] == ((4, cap, 128256), ("batch", "num_logits"))
    assert tensor_volume_problems(config, Limits(4, 8192, 2)) == []


def test_tensors_over_the_cap_are_found_with_the_limits_that_lower_them():
    config = preset("11b")
    problems = tensor_volume_problems(config, Limits(16, 8192, 2))
    worst = problems[0]
    assert (worst.graph, worst.tensor, worst.shape) == (
        "prefill",
        "present_key",
        (32, 16, 8, 8192, 128),
    )
    assert worst.volume == 2 * 2**31 and worst.limits == ("max_batch", "max_seq_len")
    assert ("decode", "past_key") in {(q.graph, q.tensor) for q in problems}
    # the largest value of each limit that fits, the others kept
    assert largest_fitting(config, Limits(16, 8192, 2), "max_batch") == 7
    assert largest_fitting(config, Limits(16, 8192, 2), "max_seq_len") == 4095
    # cross K/V grows with images: [8, 64, 8, 12808, 128] is over whatever the length
    assert largest_fitting(config, Limits(64, 8192, 2), "max_seq_len") is None
    # the decode step's self-attention scores are materialized: counted, tiny
    decode = graph_profiles("decode", config, Limits(4, 8192, 2))
    scores = tensor_shapes(decode[-1], config)["self-attention scores"]
    assert scores == ((4, 8, 4, 8193), ("batch", "past_sequence", "new_tokens"))
    assert "self-attention scores" not in tensor_shapes(
        graph_profiles("vision", config, Limits(4, 8192, 2))[-1], config
    )


# -- a shared text engine: the decode (step) graph's profiles serve both phases ----------------


def shared(limits, config=TINY, scheme=None):
    return graph_profiles("decode", config, limits, scheme or ProfileScheme(), "shared")


def test_a_shared_engine_has_prefill_decode_and_chunk_profiles_and_no_prefill_engine():
    limits = Limits(4, 512, 2)
    profiles = shared(limits)
    phases = [p.phase for p in profiles]
    assert phases == ["prefill"] * 4 + ["decode"] * 6 + ["chunk"] * 2
    for p in profiles[:4]:  # the whole prompt against one masked past slot
        assert p.ranges["past_sequence"] == (1, 1, 1)
        assert p.ranges["num_logits"] == (1, 1, p.ranges["new_tokens"][2])
    assert [p.ranges["new_tokens"][::2] for p in profiles[:4]] == [
        (1, 64), (65, 128), (129, 256), (257, 512),
    ]  # fmt: skip
    for p in profiles[4:10]:  # one new token; the past from 2 (1 is always prefill's)
        assert p.ranges["new_tokens"] == p.ranges["num_logits"] == (1, 1, 1)
    assert sorted({p.ranges["past_sequence"] for p in profiles[4:10]}) == [
        (2, 256, 256), (257, 512, 512),
    ]  # fmt: skip
    for p in profiles[10:]:  # chunks: 2..512 new tokens against the cache buffer
        assert p.ranges["new_tokens"] == (2, 512, 512) and p.ranges["batch"] == (1, 1, 4)
    for p in profiles:
        assert p.ranges["total_sequence"] == tuple(
            a + b for a, b in zip(p.ranges["past_sequence"], p.ranges["new_tokens"], strict=True)
        )
        assert ShapeProfile.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert set(all_profiles(TINY, limits, text_engine="shared")) == {"vision", "decode"}
    with pytest.raises(MllamaExportError, match="a shared text engine has no prefill engine"):
        graph_profiles("prefill", TINY, limits, text_engine="shared")
    with pytest.raises(MllamaExportError, match="unknown text engine 'one'"):
        all_profiles(TINY, limits, text_engine="one")


@pytest.mark.parametrize("limits", LIMITS, ids=str)
def test_shared_profiles_partition_every_call_with_no_gaps(limits):
    """Every call the runner makes (past 1 with 1..top new tokens; past 2..max with one new
    token, or with 2..top) lies in exactly one profile; nothing else does."""
    profiles = shared(limits)
    top = step_tokens(TINY, limits)
    assert coverage(profiles)["new_tokens"] == (1, top)
    assert coverage(profiles)["past_sequence"] == (1, limits.max_seq_len)
    for batch in sorted({1, limits.max_batch}):
        for past in range(1, limits.max_seq_len + 1):
            for new in sorted({1, 2, top // 2 or 1, top - 1 or 1, top}):
                point = {"batch": batch, "num_images": 1, "past_sequence": past, "new_tokens": new}
                found = owner(profiles, point)
                assert len(found) == 1, point
                phase = profiles[found[0]].phase
                assert phase == ("prefill" if past == 1 else "decode" if new == 1 else "chunk")


@pytest.mark.parametrize("limits", LIMITS[1:], ids=str)
def test_shared_selection_at_every_bucket_edge(limits):
    """At both sides of every edge of every phase the backend's choice is the one profile
    holding the call, of the right phase."""
    profiles = shared(limits)
    top = step_tokens(TINY, limits)
    edges = {e for p in profiles for d in ("past_sequence", "new_tokens", "batch")
             for e in (p.ranges[d][0], p.ranges[d][2])}  # fmt: skip
    values = sorted({v for e in edges for v in (e - 1, e, e + 1) if v >= 1})
    for past, new, batch in itertools.product(values, values, (1, limits.max_batch)):
        if past > limits.max_seq_len or new > top:
            continue
        point = {"batch": batch, "num_images": 1, "past_sequence": past, "new_tokens": new}
        feed = shapes_at("decode", point)
        chosen = select_profile(profiles, feed)
        assert [chosen] == owner(profiles, point), point
    with pytest.raises(MllamaExportError, match=f"new_tokens {top + 1} outside 1..{top}"):
        select_profile(profiles, shapes_at("decode", {"batch": 1, "num_images": 1,
                                                      "past_sequence": 1, "new_tokens": top + 1}))  # fmt: skip


def test_a_shared_engines_call_size_keeps_its_scores_under_the_cap():
    """A chunk's self-attention scores [B, H_kv, G*N, past + N] are materialized: the
    engine's most new tokens per call is lowered until they fit TensorRT's cap."""
    config = preset("11b")
    assert step_tokens(config, Limits(4, 8192, 2)) == 1024  # the scheme's, fits
    assert step_tokens(config, Limits(1, 512, 1)) == 512  # at most max_seq_len
    big = step_tokens(config, Limits(4, 8192, 2), ProfileScheme(step_tokens=8192))
    assert 4 * 32 * big * (8192 + big) <= MAX_TENSOR_VOLUME < 4 * 32 * (big + 1) * (8193 + big)
    chunk = shared(Limits(4, 8192, 2), config)[-1]
    scores = tensor_shapes(chunk, config)["self-attention scores"]
    assert scores[0] == (4, 8, 4 * 1024, 8192 + 1024)
    assert tensor_volume_problems(config, Limits(4, 8192, 2), text_engine="shared") == []
    # the stacked cache [32, B, 8, 8192, 128] caps batch at 7 for both text engines
    for engine in ("split", "shared"):
        assert largest_fitting(config, Limits(16, 8192, 2), "max_batch", text_engine=engine) == 7
    with pytest.raises(MllamaExportError, match="step tokens"):
        ProfileScheme(step_tokens=0)
