"""Optimization profiles as data: exact coverage, shared dims, selection at every edge."""

from __future__ import annotations

import itertools
import json

import pytest

from mllama_export.engines.profiles import (
    GRAPH_INPUTS,
    MAX_TENSOR_VOLUME,
    ProfileScheme,
    ShapeProfile,
    all_profiles,
    buckets,
    coverage,
    graph_profiles,
    largest_fitting,
    select_profile,
    tensor_shapes,
    tensor_volume_problems,
)
from mllama_export.engines.runner import Limits
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import preset
from mllama_export.graphs.contract import static_dims

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
    }[dim]


def shapes_at(graph: str, point: dict[str, int]) -> dict[str, tuple[int, ...]]:
    sizes = {"num_logits": 1, **static_dims(TINY), **point}
    sizes["image_tokens"] = point["num_images"] * PER_IMAGE
    return {s.name: s.shape(sizes) for s in GRAPH_INPUTS[graph]}


def base_point(graph: str) -> dict[str, int]:
    point = {"batch": 1, "num_images": 1}
    point.update({"prefill": {"sequence": 1}, "decode": {"past_sequence": 1}}.get(graph, {}))
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
@pytest.mark.parametrize("graph", list(GRAPH_INPUTS))
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
        for dim in set(p.ranges) - set(BUCKETED[graph]) - {"image_tokens", "num_logits"}:
            assert (p.ranges[dim][0], p.ranges[dim][2]) == (1, limit_of(limits, dim))
        if graph == "prefill":
            assert p.ranges["num_logits"] == (1, 1, p.ranges["sequence"][2])
    # every point of the promised box belongs to exactly one profile
    axes = {d: range(1, limit_of(limits, d) + 1) for d in BUCKETED[graph]}
    for values in itertools.product(*axes.values()):
        point = {**base_point(graph), **dict(zip(axes, values, strict=True))}
        assert len(owner(profiles, point)) == 1, point


@pytest.mark.parametrize("limits", LIMITS, ids=str)
@pytest.mark.parametrize("graph", list(GRAPH_INPUTS))
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
@pytest.mark.parametrize("graph", list(GRAPH_INPUTS))
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
        ({"input_ids": (2, 2)}, r"input_ids axis 1 \(one\) is 2; the model fixes it at 1"),
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
    specs = GRAPH_INPUTS["prefill"]
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
    assert shapes["min"].startswith("input_ids:3x1,position_ids:3x1,attention_mask:3x257,")
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
    assert scores == ((4, 8, 4, 8193), ("batch", "past_sequence"))
    assert "self-attention scores" not in tensor_shapes(
        graph_profiles("vision", config, Limits(4, 8192, 2))[-1], config
    )
