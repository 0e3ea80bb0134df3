"""FP8 (E4M3) explicit quantization: the quantizer's rounding, the Q/DQ the ONNX graphs hold
for each weight scheme, PyTorch's fake quantization against ONNX Runtime, the weight bytes,
and the accuracy gate.

Two tiny fp8 builds per session (per-tensor and per-channel, conftest.py, ~45 s each); the
rest exports small pieces of the model.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import load_script, write_evalset
from torch import nn

from mllama_export.cli import main
from mllama_export.engines.evalset import build_evalset
from mllama_export.engines.manifest_read import read_manifest
from mllama_export.engines.onnxrt import OnnxRuntimeBackend
from mllama_export.engines.runner import Limits, Runner
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.build import build
from mllama_export.exporter.fp8 import check_fp8_graph, onnx_weight_names
from mllama_export.exporter.fp8_check import GEMM_LIMITS, OUTPUT_LIMITS
from mllama_export.exporter.onnx_export import example_inputs, export_graph
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.config import preset
from mllama_export.graphs.model import VisionGraph
from mllama_export.graphs.quant import (
    FP8_MAX,
    ONNX_TRANSLATIONS,
    FP8Linear,
    fp8_qdq,
    quantizable_linears,
    quantize_model,
    to_fp8,
)
from mllama_export.graphs.weights import load_model
from mllama_export.validate.gate import run_gate

FP8 = onnx.TensorProto.FLOAT8E4M3FN
E4M3 = ml_dtypes.float8_e4m3fn


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- the quantizer ------------------------------------------------------------------------------


def test_to_fp8_rounds_to_nearest_even_and_saturates_like_ml_dtypes():
    # every float16 value, infinities and NaNs included
    x16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = np.isfinite(x16)
    with np.errstate(invalid="ignore"):
        expected = np.clip(x16.astype(np.float32), -FP8_MAX, FP8_MAX).astype(E4M3)
    ours = to_fp8(torch.from_numpy(x16)).view(torch.uint8).numpy()
    assert np.array_equal(ours[finite], expected.view(np.uint8)[finite])
    assert np.array_equal(to_fp8(torch.from_numpy(x16)).float().numpy()[np.isinf(x16)],
                          np.sign(x16[np.isinf(x16)]) * FP8_MAX)  # fmt: skip
    assert np.isnan(to_fp8(torch.from_numpy(x16)).float().numpy()[np.isnan(x16)]).all()
    # exact midpoints between neighbouring E4M3 values go to the even one, as ml_dtypes does
    grid = np.unique(np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32))
    grid = grid[np.isfinite(grid)]
    mid = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    got = to_fp8(torch.from_numpy(mid)).float().numpy()
    assert np.array_equal(got, mid.astype(E4M3).astype(np.float32))
    assert np.all((got.astype(E4M3).view(np.uint8) & 1) == 0)  # even mantissa
    # beyond the largest finite value: saturate (no NaN, no infinity)
    big = torch.tensor([448.0, 464.0, 1e6, -500.0, float("inf"), -float("inf")])
    assert to_fp8(big).float().tolist() == [448.0, 448.0, 448.0, -448.0, 448.0, -448.0]


def test_fake_quant_equals_onnx_runtime_qdq_bit_for_bit(tmp_path):
    """ONNX Runtime's QuantizeLinear -> DequantizeLinear (float8e4m3fn) on every float16 value
    and on random float32 values: bit for bit what fp8_qdq computes. (The export of fp8_qdq
    into exactly these two nodes is checked on real layers below.)"""
    from onnx import TensorProto, helper

    for dtype, values in (
        (torch.float16, torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.float16))),
        (torch.float32, torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 40),
    ):
        values = values[torch.isfinite(values)]
        scale = torch.tensor(0.0371, dtype=dtype)
        elem = helper.np_dtype_to_tensor_dtype(values.numpy().dtype)
        graph = helper.make_graph(
            [
                helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], saturate=1),
                helper.make_node("DequantizeLinear", ["q", "scale"], ["y"]),
            ],
            "qdq",
            [helper.make_tensor_value_info("x", elem, [values.numel()])],
            [helper.make_tensor_value_info("y", elem, [values.numel()])],
            [
                onnx.numpy_helper.from_array(scale.numpy(), "scale"),
                helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, [], [0]),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        model.ir_version = 9
        path = tmp_path / "qdq.onnx"
        onnx.save(model, str(path))
        ort_out = _session(path).run(None, {"x": values.numpy()})[0]
        ours = fp8_qdq(values, scale).numpy()
        assert ours.dtype == ort_out.dtype and np.array_equal(ours, ort_out)


def _fresh_model(tiny_dir, semantics="meta"):
    return load_model(tiny_dir, semantics, torch.float32)


def test_quantized_layers_match_onnx_runtime_to_float32_rounding(tiny_dir, tmp_path):
    """Two real decoder layers (self- and cross-attention), quantized in a float32 base:
    PyTorch's fake quantization and ONNX Runtime's Q/DQ compute the same thing."""
    model = _fresh_model(tiny_dir)
    names = [
        n for n in quantizable_linears(model) if n.startswith(("text.layers.0.", "text.layers.1."))
    ]
    # a different input scale per layer, so that a scale read from the wrong layer shows
    quantize_model(model, {n: 2.0 + 0.25 * i for i, n in enumerate(names)}, torch.float32)

    class TwoLayers(nn.Module):
        def __init__(self, text):
            super().__init__()
            self.rotary, self.first, self.cross = text.rotary, text.layers[0], text.layers[1]

        def forward(self, x, position_ids, states):
            # x: [B, S, D]; position_ids: [B, S]; states: [B, N, D] (projected image tokens)
            s = x.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
            cos, sin = self.rotary(position_ids)
            x, _, _ = self.first.prefill(x, cos, sin, causal)
            xk, xv = self.cross.cross_attn.kv(states)
            allowed = torch.ones(1, 1, s, states.shape[1], dtype=torch.bool)
            return self.cross(x, xk, xv, allowed, torch.ones(x.shape[0], s, 1))

    module = TwoLayers(model.text).eval()
    gen = torch.Generator().manual_seed(0)
    args = (
        torch.randn(2, 6, 64, generator=gen),
        torch.arange(6).repeat(2, 1),
        torch.randn(2, 9, 64, generator=gen),
    )
    path = tmp_path / "two-layers.onnx"
    program = torch.onnx.export(
        module,
        args,
        input_names=["x", "position_ids", "states"],
        dynamo=True,
        opset_version=19,
        custom_translation_table=ONNX_TRANSLATIONS,
    )
    program.save(str(path))
    expected = onnx_weight_names(module, model, args)
    modules = {n: model.get_submodule(n) for n in names}
    layout = check_fp8_graph(path, expected, modules)  # FP8 bytes and scales bit for bit
    assert layout["quantized_layers"] == sorted(names) and layout["fp8_matmuls"] == len(names)
    first, saved = modules[names[0]], modules[names[0]].input_scale
    first.input_scale = saved * 1.5
    with pytest.raises(MllamaExportError, match=f"{names[0]}: input scale differ"):
        check_fp8_graph(path, expected, modules)
    first.input_scale = saved
    out = _session(path).run(
        None, {k: a.numpy() for k, a in zip(("x", "position_ids", "states"), args, strict=True)}
    )[0]
    with torch.inference_mode():
        ref = module(*args).numpy()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6


def test_fp8_linear_quantizes_weights_per_tensor_by_default():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(8, 16, generator=gen))
    layer = FP8Linear(linear, input_amax=5.0, dtype=torch.float16)
    assert layer.scheme == "per-tensor" and layer.weight.shape == (16, 8)
    assert layer.weight_scale.shape == () and layer.weight_scale.dtype == torch.float16
    # the largest weight of the whole tensor lands on (or within rounding of) +-448
    assert 416 <= float(layer.weight.float().abs().max()) <= 448
    back = layer.dequantized_weight().float().t()
    assert float((back - linear.weight).norm() / linear.weight.norm()) < 0.05
    with pytest.raises(MllamaExportError, match="per-tensor, per-channel"):
        FP8Linear(linear, 5.0, torch.float16, "per-row")


def test_fp8_linear_quantizes_weights_per_output_channel():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(8, 16, generator=gen) * torch.logspace(-4, 1, 8)[:, None])
    layer = FP8Linear(linear, input_amax=5.0, dtype=torch.float16, scheme="per-channel")
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == (16, 8)
    assert layer.weight_scale.shape == (8,) and layer.weight_scale.dtype == torch.float16
    # the largest weight of each output channel lands on (or within rounding of) +-448, except
    # where amax / 448 is below float16's smallest normal: that scale stays normal, and the
    # channel's weights still sit in FP8's normal range, as precise relative to themselves
    peak = layer.weight.float().abs().amax(0)
    normal = linear.weight.abs().amax(1) / 448 >= torch.finfo(torch.float16).tiny
    assert torch.all((peak >= 416) & (peak <= 448) | ~normal) and not normal.all()
    assert torch.all(peak[~normal] >= 2**-6 * 16)
    back = (layer.weight.float() * layer.weight_scale.float()).t()
    rel = (back - linear.weight).norm(dim=1) / linear.weight.norm(dim=1)
    assert torch.all(rel < 0.05)
    assert float(layer.input_scale) == pytest.approx(5.0 / 448, rel=1e-3)
    layer.to(torch.float16)  # a dtype cast leaves the FP8 weight alone
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.bias.dtype == torch.float16


# -- the build ----------------------------------------------------------------------------------


def _quantized_matmuls(path: Path) -> dict[str, dict]:
    """Checked independently of exporter.fp8: {FP8 weight name: its Q/DQ facts}."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    found = {}
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        act, wdq = (producer.get(i) for i in node.input)
        if not (act and act.op_type == "DequantizeLinear") and not (
            wdq and wdq.op_type == "DequantizeLinear"
        ):
            continue
        assert act.op_type == wdq.op_type == "DequantizeLinear", node.name
        q = producer[act.input[0]]
        assert q.op_type == "QuantizeLinear" and q.input[1] == act.input[1]
        assert inits[q.input[2]].data_type == FP8  # the zero point makes the output FP8
        w = inits[wdq.input[0]]
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), None)
        found[w.name] = {
            "weight_type": w.data_type,
            "weight_shape": list(w.dims),
            "weight_scale_shape": list(inits[wdq.input[1]].dims),
            "axis": axis,
            "input_scale_shape": list(inits[act.input[1]].dims),
        }
    return found


# per-tensor: one scalar weight scale and no axis (TensorRT's fused FP8 GEMM); per-channel:
# one scale per output channel, on axis 1 of the [in, out] weight the MatMul reads
LAYOUTS = {
    "per-tensor": lambda d_out: {"weight_scale_shape": [], "axis": None},
    "per-channel": lambda d_out: {"weight_scale_shape": [d_out], "axis": 1},
}


@pytest.mark.parametrize("scheme, folder", [("per-tensor", "fp8_dir"), ("per-channel", "fp8c_dir")])
def test_every_quantized_matmul_has_the_schemes_qdq_and_nothing_else_is_quantized(
    scheme, folder, request
):
    fp8_dir = request.getfixturevalue(folder)
    manifest = read_manifest(fp8_dir)
    assert manifest["quantization"]["weight_scheme"] == scheme
    config = preset("tiny")
    layers = manifest["quantization"]["layers"]
    assert sorted(layers) == sorted(quantizable_linears(_meta_model(config)))
    for name, graph in manifest["graphs"].items():
        path = fp8_dir / graph["file"]
        found = _quantized_matmuls(path)
        assert len(found) == len(graph["quantized_layers"]) > 0
        for facts in found.values():
            d_in, d_out = facts["weight_shape"]
            assert facts == {
                "weight_type": FP8,
                "weight_shape": [d_in, d_out],
                **LAYOUTS[scheme](d_out),
                "input_scale_shape": [],  # per tensor, a constant
            }
        # each layout is exactly what the check expects, and the other is refused
        expected = {w: w.removesuffix(".weight") for w in found}
        check_fp8_graph(path, expected, scheme=scheme)
        other = next(s for s in LAYOUTS if s != scheme)
        with pytest.raises(MllamaExportError, match=f"\\({other}\\)"):
            check_fp8_graph(path, expected, scheme=other)
        model = onnx.load(str(path), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        # q/k/v share one quantized input, as do gate/up: at most one Q per quantized MatMul
        assert 0 < ops.count("QuantizeLinear") <= len(found)
        assert ops.count("DequantizeLinear") == ops.count("QuantizeLinear") + len(found)
        # activations: scalar scales, no axis attribute on their Q/DQ either
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        activations = [n for n in qdq if n.input[0] not in found]
        assert activations and all("axis" not in {a.name for a in n.attribute} for n in activations)
        types = {t.name: t.data_type for t in model.graph.initializer}
        if name != "vision":  # embeddings and lm_head stay 16-bit
            assert types["text.embed_tokens.weight"] == onnx.TensorProto.FLOAT16
        assert sum(t == FP8 for t in types.values()) == len(found) + 1  # + the zero point
    vision, prefill, decode = (
        manifest["graphs"][g]["quantized_layers"] for g in ("vision", "prefill", "decode")
    )
    # default: the vision encoder is untouched; the vision graph quantizes only the text
    # decoder's cross-attention K/V projections, which run there on the image tokens
    assert vision and all(n.endswith(("cross_attn.k_proj", "cross_attn.v_proj")) for n in vision)
    assert prefill == decode and set(prefill) | set(vision) == set(layers)
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in layers)


def _meta_model(config):
    from mllama_export.graphs.model import MllamaModel

    with torch.device("meta"):
        return MllamaModel(config)


def test_manifest_records_fp8(fp8_dir):
    manifest = read_manifest(fp8_dir)
    assert manifest["precision"] == "fp8" and manifest["io_dtype"] == "float16"
    assert manifest["model"]["xattn_mask"] == "meta"
    assert manifest["onnxruntime"] == {"graph_optimization": "basic"}
    q = manifest["quantization"]
    assert q["vision_encoder"] is False and q["unquantized_dtype"] == "float16"
    assert q["weight_scheme"] == "per-tensor" and "no axis" in q["weights"]
    assert manifest["build_options"]["fp8_weights"] == "per-tensor"
    cases = build_evalset(preset("tiny"), Limits(**manifest["limits"]), 8)
    assert q["calibration"]["cases"] == [c.name for c in cases]
    for entry in q["layers"].values():
        assert entry["input_amax"] > 0
        assert entry["input_scale"] == pytest.approx(entry["input_amax"] / 448, rel=1e-3)
    assert {g["precision"] for g in manifest["graphs"].values()} == {"fp8"}
    for graph in manifest["graphs"].values():
        check = graph["check"]  # every FP8 GEMM within its output's rounding (fp8_check.py)
        assert check["ran"] and check["depth"] == "full"
        assert (
            1e-5
            < check["gemm_rel_l2_max"]
            <= check["gemm_limit_rel_l2"]
            == GEMM_LIMITS[torch.float16]
        )
        assert check["limit_rel_l2"] == OUTPUT_LIMITS[torch.float16]
        assert max(o["rel_l2"] for o in check["outputs"].values()) <= 2e-3


def test_fp8_weight_bytes_are_half_the_fp16_ones(fp8_dir):
    """Every FP8 weight is one byte per element in text.onnx.data; what stays 16-bit
    (embeddings, lm_head) keeps two. On tiny the embedding and lm_head are a quarter of the
    16-bit text weights, so the whole file (345,088 bytes; the per-tensor weight scales are
    scalars inside the .onnx) is ~0.62 of an fp16 build's (558,080 bytes)."""
    for graph in ("prefill", "decode"):
        path = fp8_dir / "onnx" / f"{graph}.onnx"
        model = onnx.load(str(path), load_external_data=False)
        fp8 = other = fp16_equivalent = 0
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            length = int({e.key: e.value for e in t.external_data}["length"])
            numel = int(np.prod(t.dims))
            if t.data_type == FP8:
                assert length == numel
                fp8 += length
                fp16_equivalent += 2 * numel
            else:
                assert t.data_type == onnx.TensorProto.FLOAT16 and length == 2 * numel
                other += length
                # per-channel weight scales (none here: per-tensor) exist in FP8 builds only
                fp16_equivalent += 0 if t.name.endswith("weight_scale") else length
        data = (path.parent / "text.onnx.data").stat().st_size  # prefill's and decode's
        assert data >= fp8 + other and fp8 > other  # FP8 weights are most of the file
        assert fp16_equivalent == 558_080  # what the fp16 build of tiny writes
        assert data == 345_088 and data / fp16_equivalent == pytest.approx(0.62, abs=0.02)


def test_check_fp8_graph_catches_a_wrong_axis_and_a_missing_layer(fp8c_dir, tmp_path):
    manifest = read_manifest(fp8c_dir)
    folder = Path(shutil.copytree(fp8c_dir / "onnx", tmp_path / "onnx"))
    path = folder / "decode.onnx"
    model = onnx.load(str(path), load_external_data=False)
    weights = [t.name for t in model.graph.initializer if t.data_type == FP8 and t.dims]
    expected = {w: w.removesuffix(".weight") for w in weights}
    assert (
        check_fp8_graph(path, expected, scheme="per-channel")["quantized_layers"]
        == manifest["graphs"]["decode"]["quantized_layers"]
    )
    dq = next(
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in expected
    )
    for attr in dq.attribute:
        if attr.name == "axis":
            attr.i = 0
    onnx.save(model, str(path))
    layer = expected[dq.input[0]]
    with pytest.raises(MllamaExportError, match=f"{layer}: weight scale .* on axis 0"):
        check_fp8_graph(path, expected, scheme="per-channel")
    with pytest.raises(MllamaExportError, match=r"not quantized \['extra'\]"):
        check_fp8_graph(path, {**expected, "extra.weight": "extra"}, scheme="per-channel")


def test_vision_option_quantizes_the_vision_encoder(tiny_dir, tmp_path):
    with pytest.raises(MllamaExportError, match="fp8-vision"):
        BuildOptions(model="tiny", out=tmp_path, precision="fp16", fp8_vision=True).check(
            preset("tiny")
        )
    model = _fresh_model(tiny_dir)
    names = quantizable_linears(model, vision=True)
    default = quantizable_linears(model)
    extra = sorted(set(names) - set(default))
    assert "projector" in extra and all(n.startswith(("vision.", "projector")) for n in extra)
    assert any(n.endswith("mlp.fc1") for n in extra) and "text.lm_head" not in names
    quantize_model(model, dict.fromkeys(names, 2.0), torch.float16)
    options = BuildOptions(model="tiny", out=tmp_path, precision="fp8", fp8_vision=True)
    graph, path = VisionGraph(model), tmp_path / "vision.onnx"
    export_graph(graph, model.config, options, path)
    args = example_inputs(graph.INPUTS, model.config, torch.float16)
    layout = check_fp8_graph(path, onnx_weight_names(graph, model, args))
    vision_side = [
        n
        for n in names
        if n.startswith(("vision.", "projector")) or ".cross_attn.k" in n or ".cross_attn.v" in n
    ]
    assert layout["quantized_layers"] == sorted(vision_side)
    assert "vision.patch_embedding" not in layout["quantized_layers"]  # a Conv2d: untouched


# -- accuracy -----------------------------------------------------------------------------------


def test_gate_on_fp8_tiny_per_channel(fp8c_dir):
    """`build --precision fp8 --fp8-weights per-channel` on tiny passes the accuracy gate with
    the packaged fp8 thresholds, default steps. Tiny's random logits are nearly flat (median
    top-1/top-2 gap ~0.2 of the row RMS), so top-1 holds only up to ties: flips within the
    one-sigma swing the fp8 rel_l2 limit allows (top1_tie_margin 0.21 RMS) count as ties, as
    docs/accuracy.md derives; rel_l2, cosine, top-5 and KL are held as they are. (The
    per-tensor default fails one stage here: tests/test_fp8_verdict.py.)"""
    report = run_gate(fp8c_dir)
    assert report.passed, report.summary_line()
    assert report.precision == "fp8" and len(report.results) == 5 + 6 * 9
    logits = [r.metrics for r in report.results if r.stage != "vision"]
    assert all(m.nonfinite == 0 for m in logits)
    assert 0.02 < max(m.rel_l2 for m in logits) <= 0.15
    assert min(m.top5_agreement for m in logits) >= 0.97
    assert report.extra["top1_ties"] == {"tie_tolerance": 0.0, "tie_margin": 0.21}


def test_fp8_artifacts_generate(fp8_dir):
    runner = Runner.from_artifacts(fp8_dir)
    out = runner.generate_ids([[500, 12, 13], [500, 14]], max_new_tokens=4)
    assert [len(t) for t in out.token_ids] == [4, 4]


def test_fp8_needs_basic_graph_optimization_on_onnx_runtime(fp8_dir):
    graph = read_manifest(fp8_dir)["graphs"]["decode"]
    with pytest.raises(MllamaExportError, match="float8"):
        OnnxRuntimeBackend(fp8_dir / graph["file"], (), (), optimization="all")
    functools.partial(OnnxRuntimeBackend, optimization="basic")(
        fp8_dir / graph["file"], (), ()
    )  # loads


def test_quantize_model_keeps_rope_in_float32(tiny_dir):
    model = _fresh_model(tiny_dir)
    quantize_model(model, dict.fromkeys(quantizable_linears(model), 1.0), torch.float16)
    assert model.text.rotary.inv_freq.dtype == torch.float32
    assert model.text.embed_tokens.weight.dtype == torch.float16
    assert isinstance(model.text.layers[0].mlp.up_proj, FP8Linear)
    assert type(model.text.lm_head) is nn.Linear and type(model.projector) is nn.Linear


# -- --fp8-exclude and --calibration -------------------------------------------------------------


def test_excluded_layers_stay_16_bit_and_a_calibration_folder_sets_the_scales(fp8_dir, tmp_path):
    folder = write_evalset(
        tmp_path / "calibration",
        [
            '{"prompt": "What is in the image?", "images": ["wide.png"]}',
            '{"token_ids": [500, 512, 30, 31, 512, 32], "images": ["tall.png", "wide.png"], '
            '"name": "two"}',
            '{"prompt": "Plain text."}',
        ],
    )
    exclude = ("text.layers.0.*", "*.cross_attn.o_proj")
    options = BuildOptions(
        model="tiny",
        out=tmp_path / "out",
        precision="fp8",
        fp8_exclude=exclude,
        calibration=folder,
    )
    manifest = read_manifest(build(options))
    q = manifest["quantization"]
    assert q["excluded"] == list(exclude) and q["calibration"]["cases"] == [
        "line-1",
        "two",
        "line-3",
    ]
    assert q["calibration"]["set"].startswith("user folder")
    default = read_manifest(fp8_dir)["quantization"]["layers"]
    kept = [n for n in default if not n.startswith("text.layers.0.")]
    kept = [n for n in kept if not n.endswith("cross_attn.o_proj")]
    assert sorted(q["layers"]) == sorted(kept) and len(kept) < len(default)
    # the prefill graph (checked at build time against the model) holds exactly those
    assert set(manifest["graphs"]["prefill"]["quantized_layers"]) <= set(kept)
    assert not any(
        n.startswith("text.layers.0.") for n in manifest["graphs"]["prefill"]["quantized_layers"]
    )
    # other data, other scales
    name = "text.layers.1.mlp.up_proj"
    assert q["layers"][name]["input_amax"] != default[name]["input_amax"]
    assert run_gate(options.out, steps=2).passed
    shown = CliRunner().invoke(main, ["inspect", str(options.out)]).output
    assert f"fp8         {len(kept)} linear layers, without the vision encoder, excluding " in shown
    assert f"calibrated on the user folder {folder} (3 cases)" in shown
    assert "; per-tensor weight scales;" in shown


def test_fp8_options_are_refused_before_any_work(tiny_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MllamaExportError, match="'text.nope.\\*' matches none"):
        build(BuildOptions(model="tiny", out=out, precision="fp8", fp8_exclude=("text.nope.*",)))
    with pytest.raises(MllamaExportError, match="leaves no layer in FP8"):
        build(BuildOptions(model="tiny", out=out, precision="fp8", fp8_exclude=("*",)))
    with pytest.raises(MllamaExportError, match="calibration with precision fp16"):
        build(BuildOptions(model="tiny", out=out, precision="fp16", calibration=tmp_path))
    with pytest.raises(MllamaExportError, match="calibration '.*missing' does not exist"):
        build(
            BuildOptions(model="tiny", out=out, precision="fp8", calibration=tmp_path / "missing")
        )
    bad = write_evalset(tmp_path / "bad", ['{"prompt": "fine"}', '{"prompt": 3}'])
    with pytest.raises(MllamaExportError, match="line 2: prompt is 3; expected a non-empty string"):
        build(BuildOptions(model=str(tiny_dir), out=out, precision="fp8", calibration=bad))
    assert not out.exists()


# -- benchmarks/fp8_gemm.py: real FP8 matrix products (here the CPU's) ----------------------------


def _fp8_gemm_script():
    return load_script("fp8_gemm")


@pytest.mark.parametrize("scheme", ["per-tensor", "per-channel"])
def test_fake_quant_matches_scaled_mm_on_the_same_fp8_bytes(scheme):
    """The GPU script's numerics, run here on the CPU's torch._scaled_mm: FP8Linear and a real
    FP8 matrix product (tensor-wise scales for per-tensor weights, row-wise for per-channel)
    differ by float32 summation order only; with a bf16 output, by its rounding (2**-9
    relative)."""
    script = _fp8_gemm_script()
    for row in script.numerics("cpu", 32, script.SMALL, scheme=scheme):
        assert row["scheme"] == scheme
        assert row["exact"][0] < 1e-6 and row["exact"][1] < 2e-6, row
        assert row["scaled"][0] < 4e-3 and row["scaled"][1] < 4e-3, row


def test_the_timed_fp8_layers_compute_the_bf16_layer():
    script = _fp8_gemm_script()
    x = torch.randn(2, 8, script.SMALL.hidden, dtype=torch.bfloat16)
    past = torch.randn(2, script.SMALL.kv_heads, 4, script.SMALL.head_dim, dtype=torch.bfloat16)
    for scheme in ("per-tensor", "per-channel"):
        layer = script.DecoderLayer("cpu", script.SMALL, scheme=scheme)
        assert layer.fp8["q_proj"][1].dim() == (0 if scheme == "per-tensor" else 1)
        with torch.inference_mode():
            bf16 = layer.forward(x, past, past, layer.gemm_bf16).float()
            fp8 = layer.forward(x, past, past, layer.gemm_fp8).float()
        assert 1e-3 < ((fp8 - bf16).norm() / bf16.norm()).item() < 0.1
    rows = script.timing("cpu", script.SMALL, 1, cases=[("decode", 2, 1, 8)])
    assert set(rows[0]) >= {"bf16", "fp8 per-tensor", "fp8 per-channel", "bf16 / fp8 per-tensor"}
