"""LLaVA's optimization profiles as data (exact coverage, bucket edges that account for image
tokens, selection at every edge, TensorRT's tensor cap) and the TensorRT stand-in building and
running engines of them on exported tiny graphs."""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import pytest
import torch

from mllama_export.engines.llava_profiles import (
    LlavaProfileScheme,
    all_profiles,
    engine_graphs,
    graph_profiles,
    largest_fitting,
    max_image_tiles,
    max_image_tokens,
    sequence_buckets,
    tensor_shapes,
    tensor_volume_problems,
)
from mllama_export.engines.shapes import MAX_TENSOR_VOLUME, ShapeProfile, coverage, select_profile
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.engine_stage import check_tensor_volumes
from mllama_export.graphs.family import family_named
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.llava_contract import GRAPHS, static_dims
from mllama_export.graphs.llava_layout import image_token_count
from mllama_export.graphs.llava_presets import llava_preset

NEXT = llava_preset("llava-next-tiny")
V15 = llava_preset("llava-1.5-7b")
LIMITS = [Limits(1, 2, 1), Limits(4, 512, 2), Limits(3, 700, 3), Limits(2, 90, 1)]
BUCKETED = {
    "vision": ("num_tiles",),
    "prefill": ("sequence",),
    "decode": ("batch", "past_sequence"),
}


def limit_of(config, limits: Limits, dim: str) -> int:
    tiles = limits.max_batch * limits.max_images * max_image_tiles(config)
    return {
        "batch": limits.max_batch,
        "num_tiles": tiles,
        "sequence": limits.max_seq_len,
        "past_sequence": limits.max_seq_len,
    }[dim]


def shapes_at(config, graph: str, point: dict[str, int]) -> dict[str, tuple[int, ...]]:
    sizes = {"batch": 1, "num_tiles": 1, "num_logits": 1, **static_dims(config), **point}
    return {s.name: s.shape(sizes) for s in GRAPHS[graph].inputs}


def owner(profiles, point) -> list[int]:
    return [
        i
        for i, p in enumerate(profiles)
        if all(lo <= point[d] <= hi for d, (lo, _, hi) in p.ranges.items() if d in point)
    ]


def test_image_tokens_and_tiles_come_from_the_config():
    assert max_image_tokens(V15) == 576 == image_token_count(V15, (480, 640))
    assert max_image_tiles(V15) == 1
    mistral = llava_preset("llava-next-mistral-7b")
    # 672 x 672: a 2 x 2 grid of 24 x 24 patches, each of 48 rows closed by a newline
    assert max_image_tokens(mistral) == 576 + 48 * 49 == 2928
    assert max_image_tiles(mistral) == 5
    assert max_image_tokens(NEXT) == 16 + 8 * 9 and max_image_tiles(NEXT) == 5


def test_prefill_buckets_account_for_the_image_tokens():
    # LLaVA 1.5: text-only buckets below one image's 576 tokens, then 1 and 2 images + 128
    assert sequence_buckets(V15, Limits(4, 4096, 2)) == [
        (1, 64), (65, 128), (129, 256), (257, 512), (513, 704), (705, 1280), (1281, 2560),
        (2561, 4096),
    ]  # fmt: skip
    mistral = llava_preset("llava-next-mistral-7b")
    edges = [hi for _, hi in sequence_buckets(mistral, Limits(1, 32768, 4))]
    assert edges == [64, 128, 256, 512, 1024, 2048, 3056, 5984, 11840, 23680, 32768]
    assert sequence_buckets(V15, Limits(1, 600, 2))[-1] == (513, 600)
    for config, limits in itertools.product((V15, NEXT), LIMITS):
        got = sequence_buckets(config, limits)
        assert got[0][0] == 1 and got[-1][1] == limits.max_seq_len
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(got))


@pytest.mark.parametrize("limits", LIMITS, ids=str)
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_profiles_cover_exactly_the_promised_ranges(graph, limits):
    profiles = graph_profiles(graph, NEXT, limits)
    covered = coverage(profiles)
    for dim in set(covered) - {"num_logits"}:
        assert covered[dim] == (1, limit_of(NEXT, limits, dim)), dim
    for dim in BUCKETED[graph]:
        ranges = sorted({(p.ranges[dim][0], p.ranges[dim][2]) for p in profiles})
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges)), ranges
    for p in profiles:
        for dim in set(p.ranges) - set(BUCKETED[graph]) - {"num_logits"}:
            assert p.ranges[dim][::2] == (1, limit_of(NEXT, limits, dim)), dim
        if graph == "prefill":
            assert p.ranges["num_logits"] == (1, 1, p.ranges["sequence"][2])
    axes = {d: range(1, limit_of(NEXT, limits, d) + 1) for d in BUCKETED[graph]}
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values, strict=True))
        assert len(owner(profiles, point)) == 1, point


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_opt_and_shared_dims_agree_across_inputs(graph):
    limits = Limits(4, 512, 2)
    fixed = static_dims(NEXT)
    for p in graph_profiles(graph, NEXT, limits):
        for dim, (lo, opt, hi) in p.ranges.items():
            assert 1 <= lo <= opt <= hi
            if dim in BUCKETED[graph] and (lo, hi) != (1, limit_of(NEXT, limits, dim)):
                assert opt == hi, dim  # tuned at the top of its bucket
        if graph == "prefill":  # the common call: one row, one image's tiles, one logit
            assert [p.ranges[d][1] for d in ("batch", "num_tiles", "num_logits")] == [1, 5, 1]
        for k in range(3):
            seen: dict[str, set[int]] = {}
            for name, dims in p.inputs.items():
                for d, x in zip(dims, p.shapes[name][k], strict=True):
                    seen.setdefault(d, set()).add(x)
            for d, values in seen.items():
                assert values == {p.ranges[d][k] if d in p.ranges else fixed[d]}, (d, k)
        assert ShapeProfile.from_json(json.loads(json.dumps(p.to_json()))) == p


@pytest.mark.parametrize("limits", LIMITS[1:], ids=str)
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_selection_at_every_bucket_edge(graph, limits):
    profiles = graph_profiles(graph, NEXT, limits)
    for dim in BUCKETED[graph]:
        top = limit_of(NEXT, limits, dim)
        edges = {e for p in profiles for e in (p.ranges[dim][0], p.ranges[dim][2])}
        others = [d for d in BUCKETED[graph] if d != dim]
        for value in sorted({v for e in edges for v in (e - 1, e, e + 1)}):
            for rest in itertools.product(*({1, limit_of(NEXT, limits, d)} for d in others)):
                point = {**dict(zip(others, rest, strict=True)), dim: value}
                feed = shapes_at(NEXT, graph, point)
                if not 1 <= value <= top:
                    with pytest.raises(MllamaExportError, match=f"{dim} {value} outside 1..{top}"):
                        select_profile(profiles, feed)
                    continue
                assert [select_profile(profiles, feed)] == owner(profiles, point), point


def test_a_text_only_prefill_is_one_placeholder_tile_and_no_empty_tensor():
    profiles = graph_profiles("prefill", NEXT, Limits(2, 200, 1))
    assert select_profile(profiles, shapes_at(NEXT, "prefill", {"sequence": 9})) == 0
    with pytest.raises(MllamaExportError, match="num_tiles 0 outside 1..10"):
        select_profile(profiles, shapes_at(NEXT, "prefill", {"sequence": 9, "num_tiles": 0}))


def test_refusals_are_one_line():
    for call, message in (
        (lambda: engine_graphs("shared"), "LLaVA has no shared text engine"),
        (lambda: all_profiles(NEXT, Limits(1, 8, 1), text_engine="one"), "unknown text engine"),
        (lambda: graph_profiles("lm", NEXT, Limits(1, 8, 1)), "unknown graph 'lm'"),
        (lambda: graph_profiles("vision", NEXT, Limits(0, 8, 1)), "max_batch 0"),
        (lambda: LlavaProfileScheme(past_growth=1), "growth 1"),
        (lambda: LlavaProfileScheme(image_text=0), "image_text 0"),
    ):
        with pytest.raises(MllamaExportError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    assert family_named("llava").part("profiles").engine_graphs() == tuple(GRAPHS)


def test_tensors_over_the_cap_and_the_limits_that_lower_them():
    mistral = llava_preset("llava-next-mistral-7b")
    # 7B's 32 KV heads: the stacked cache [32, 4, 32, 4096, 128] is 2^31 elements, one over
    assert tensor_volume_problems(V15, Limits(3, 4096, 2)) == []
    over = tensor_volume_problems(V15, Limits(4, 4096, 2))[0]
    assert (over.tensor, over.volume) == ("present_key", 2**31)
    assert largest_fitting(V15, Limits(4, 4096, 2), "max_batch") == 3
    problems = tensor_volume_problems(mistral, Limits(4, 32768, 2))
    worst = problems[0]
    assert (worst.graph, worst.tensor) == ("prefill", "prefill attention mask")
    assert worst.shape == (4, 1, 4 * 32768, 32768) and worst.limits == ("max_batch", "max_seq_len")
    assert {(q.graph, q.tensor) for q in problems} >= {("prefill", "present_key")}
    best = largest_fitting(mistral, Limits(4, 32768, 2), "max_seq_len")
    assert 4 * 4 * best * best <= MAX_TENSOR_VOLUME < 4 * 4 * (best + 1) ** 2
    with pytest.raises(MllamaExportError, match=r"prefill engine's prefill attention mask.*--max-"):
        check_tensor_volumes(mistral, Limits(4, 32768, 2))
    scores = tensor_shapes(graph_profiles("decode", mistral, Limits(4, 8192, 2))[-1], mistral)
    assert scores["self-attention scores"] == ((4, 8, 4, 8193), ("batch", "past_sequence"))
    assert scores["past_key"][0] == (32, 4, 8, 8192, 128)


# -- the TensorRT stand-in: engines of these profiles on exported tiny graphs -------------------

STANDIN_LIMITS = Limits(2, 300, 2)
POINTS = {
    "vision": [{"num_tiles": 1}, {"num_tiles": 5}, {"num_tiles": 6}, {"num_tiles": 20}],
    "prefill": [
        {"batch": 1, "sequence": 9, "num_tiles": 1},
        {"batch": 2, "sequence": 64, "num_tiles": 6, "num_logits": 3},
        {"batch": 1, "sequence": 65, "num_tiles": 5},
        {"batch": 2, "sequence": 217, "num_tiles": 20},
    ],
    "decode": [
        {"batch": 1, "past_sequence": 9},
        {"batch": 2, "past_sequence": 256},
        {"batch": 2, "past_sequence": 257},
        {"batch": 1, "past_sequence": 300},
    ],
}


def quick_export(graph: torch.nn.Module, path) -> None:
    """torch.onnx's TorchScript exporter: 1.5 s for the three tiny graphs where the dynamo
    exporter takes 28 s on 2 cores. What is tested here is the profiles, which read only the
    contract's names and dims; the dynamo export itself is tests/test_llava_onnx.py's."""
    import warnings

    from mllama_export.exporter.llava_build import example_inputs
    from mllama_export.graphs.llava_contract import dynamic_axes

    specs = (*graph.INPUTS, *graph.OUTPUTS)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph.eval(),
            example_inputs(graph.INPUTS, NEXT, torch.float32),
            str(path),
            input_names=[s.name for s in graph.INPUTS],
            output_names=[s.name for s in graph.OUTPUTS],
            dynamic_axes={s.name: dynamic_axes(s) for s in specs},
            dynamo=False,
            opset_version=18,
        )


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """The tiny NeXT graphs exported once, and stand-in engines of their profiles."""
    import trt_standin as standin

    from mllama_export.graphs.llava_model import GRAPH_MODULES
    from mllama_export.validate.llava_reference import synthetic_model

    model = synthetic_model(NEXT, 0)
    folder = tmp_path_factory.mktemp("llava-standin")
    profiles = all_profiles(NEXT, STANDIN_LIMITS)
    for name, cls in GRAPH_MODULES.items():
        quick_export(cls(model), folder / f"{name}.onnx")
        standin.write_engine(folder, name, folder / f"{name}.onnx", profiles[name])
    return folder, profiles


def random_feed(graph: str, point: dict, seed: int) -> dict[str, np.ndarray]:
    from mllama_export.exporter.llava_build import example_inputs

    sizes = {"batch": 1, "num_tiles": 1, "num_logits": 1, "sequence": 1, "past_sequence": 1}
    args = example_inputs(GRAPHS[graph].inputs, NEXT, torch.float32, {**sizes, **point}, seed)
    return {s.name: a.numpy() for s, a in zip(GRAPHS[graph].inputs, args, strict=True)}


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_the_stand_in_builds_the_profiles_and_runs_them_as_onnxruntime_does(
    stand_in, monkeypatch, graph
):
    import trt_standin as standin

    from mllama_export.engines.onnxrt import OnnxRuntimeBackend

    folder, profiles = stand_in
    onnx = folder / f"{graph}.onnx"
    for p in profiles[graph]:  # TensorRT's build check: no tensor over the cap at any maximum
        assert standin.over_cap(onnx, {n: s[2] for n, s in p.shapes.items()}) == []
    monkeypatch.setitem(sys.modules, "tensorrt", standin.fake_tensorrt())
    spec = GRAPHS[graph]
    backend = standin.CpuTensorRTBackend(
        folder / f"{graph}.engine", spec.inputs, spec.outputs, profiles[graph]
    )
    reference = OnnxRuntimeBackend(onnx, spec.inputs, spec.outputs)
    used = []
    for seed, point in enumerate(POINTS[graph]):
        feed = random_feed(graph, point, seed)
        out, ref = backend.infer(feed), reference.infer(feed)
        for key, value in ref.items():
            np.testing.assert_allclose(out[key], value, rtol=1e-5, atol=1e-5)
        used.append(backend._active)
        assert [used[-1]] == owner(profiles[graph], point), point
    assert len(set(used)) >= 3
