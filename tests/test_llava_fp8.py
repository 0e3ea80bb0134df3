"""LLaVA's FP8 (exporter/llava_fp8.py, exporter/llava_layerwise.py): which linears, calibration
layer by layer equal to the whole model's, the FP8 graphs on ONNX Runtime passing the build's
check, a planted defect failing it by name, and sensitivity ranking LLaVA's layers.

The graphs are exported one by one (exporter/onnx_export.py export_graph) from the quantized
model in memory, so that a planted defect can be put between the model and its check; the
CLI's FP8 build of LLaVA is tests/test_llava_build.py's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from mllama_export.errors import MllamaExportError
from mllama_export.exporter import llava_fp8
from mllama_export.exporter.calibration import CALIBRATION_STEPS, calibrate
from mllama_export.exporter.llava_layerwise import LazyModel
from mllama_export.exporter.onnx_export import export_graph
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.family import family_named
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_model import GRAPH_MODULES
from mllama_export.graphs.quant import FP8Linear

LLAVA = family_named("llava")
LIMITS = Limits(max_batch=3, max_seq_len=160, max_images=2)


def _config(name: str) -> LlavaConfig:
    return LlavaConfig.from_hf_dict(LLAVA.presets[name])


def _write(config: LlavaConfig, out: Path) -> Path:
    return LLAVA.part("synth")(config, out, 0)


def _reader():
    return LLAVA.part("checkpoint")


def _options(**kw) -> BuildOptions:
    limits = dict(max_batch=LIMITS.max_batch, max_seq_len=LIMITS.max_seq_len, max_images=2)
    return BuildOptions(
        model="llava-next-tiny", out=Path("unused"), precision="fp8", **limits, **kw
    )


@pytest.fixture(scope="module")
def next_tiny(tmp_path_factory):
    config = _config("llava-next-tiny")
    folder = _write(config, tmp_path_factory.mktemp("llava-fp8") / "next-tiny")
    return _reader()(folder, config)


@pytest.fixture(scope="module")
def calibrated(next_tiny):
    """The --fp8-vision build's calibration, streamed, and its manifest entry."""
    options = _options(fp8_vision=True)
    names = llava_fp8.fp8_layers(next_tiny.config, options)
    cases = llava_fp8.calibration_cases(next_tiny.config, options, None)
    entry = llava_fp8.quantize_fp8(next_tiny, options, names, cases)
    return options, names, cases, entry


def test_the_decoder_linears_by_default_the_tower_and_projector_with_fp8_vision():
    config = _config("llava-tiny")
    default = llava_fp8.fp8_layers(config, _options())
    per_layer = [f"self_attn.{p}_proj" for p in "qkvo"] + [
        f"mlp.{p}_proj" for p in ("gate", "up", "down")
    ]
    assert default == [
        f"text.layers.{i}.{p}" for i in range(config.text.num_layers) for p in per_layer
    ]
    vision = llava_fp8.fp8_layers(config, _options(fp8_vision=True))
    tower = [n for n in vision if n.startswith("vision.")]
    assert set(vision) - set(default) == {*tower, "projector.linear_1", "projector.linear_2"}
    assert len(tower) == 6 * config.vision_depth  # q/k/v/out_proj, fc1, fc2 of each layer
    layers, names = llava_fp8.fp8_layout(config, _options())
    assert layers == default and names["vision"] == {}  # an ordinary float16 vision graph
    for graph in ("prefill", "decode"):
        assert sorted(names[graph].values()) == sorted(default)
    with pytest.raises(MllamaExportError, match="only in builds with --fp8-vision"):
        llava_fp8.fp8_layers(config, _options(fp8_exclude=("projector.*",)))
    with pytest.raises(MllamaExportError, match="leaves no layer in FP8"):
        llava_fp8.fp8_layers(config, _options(fp8_exclude=("text.*",)))


def test_the_plan_of_a_full_size_fp8_vision_build_on_the_meta_device():
    config = _config("llava-next-vicuna-7b")
    layers, names = llava_fp8.fp8_layout(config, _options(fp8_vision=True))
    # 32 decoder layers of 7 linears; 23 tower layers (to the feature layer -2) of 6; 2
    assert len(layers) == 32 * 7 + 23 * 6 + 2
    assert {g: len(n) for g, n in names.items()} == {"vision": 140, "prefill": 224, "decode": 224}


# one float32 rounding, as tests/test_fp8_streamed.py allows
ULPS = 4 * 2.0**-23


def test_streamed_calibration_is_the_whole_models(next_tiny, calibrated):
    options, names, cases, entry = calibrated
    assert [c.name for c in cases][:4] == [
        "text-only",
        "one-image",
        "two-images",
        "padded-batch-of-3",
    ]
    streamed = {n: layer["input_amax"] for n, layer in entry["layers"].items()}
    assert list(streamed) == names and all(v > 0 for v in streamed.values())
    model = llava_fp8.load_fp8_model(next_tiny, {}, torch.float32, "per-tensor")
    whole = calibrate(model, names, cases, options.limits, CALIBRATION_STEPS)
    # bit for bit on this project's machines; within ULPS where MKL's kernels follow memory
    # alignment (tests/test_fp8_streamed.py proves Mllama's equal under MKL_CBWR)
    assert all(abs(streamed[n] - whole[n]) <= ULPS * whole[n] for n in names), {
        n: (whole[n], streamed[n]) for n in names if whole[n] != streamed[n]
    }
    assert entry["calibration"]["cases"] == [c.name for c in cases]
    assert entry["vision_encoder"] is True and entry["weight_scheme"] == "per-tensor"


def test_the_lazy_model_reads_each_unit_once_per_graph_call(next_tiny):
    from mllama_export.exporter.layermajor import Job, LayerMajor

    lazy = LazyModel(next_tiny)
    case = llava_fp8.check_cases(next_tiny.config, LIMITS)[0]  # one image
    runner = lazy.runner(LIMITS)

    def generate():
        return runner.generate_ids(case.prompts, case.images, 2, stop_tokens=set())

    scheduler = LayerMajor(lazy)
    first, second = scheduler.run([Job(generate), Job(generate)])
    assert first.token_ids == second.token_ids
    config = next_tiny.config
    vision_units = config.vision_depth + 1
    text_units = config.text.num_layers + 2  # embedding, layers, lm_head
    assert scheduler.loads == vision_units + 2 * text_units  # vision, prefill, one step
    assert all(p.is_meta for p in lazy.model.text.layers.parameters())


@pytest.fixture(scope="module")
def exported(next_tiny, calibrated, tmp_path_factory):
    """The three FP8 graphs, exported from the model quantized as the artifacts hold it."""
    options, _, _, entry = calibrated
    amax = llava_fp8.input_amax(entry)
    model = llava_fp8.load_quantized(next_tiny, options, amax)
    folder = tmp_path_factory.mktemp("llava-fp8-onnx")
    for name, cls in GRAPH_MODULES.items():
        export_graph(cls(model), next_tiny.config, options, folder / f"{name}.onnx")
    return model, folder, options


def test_the_fp8_graphs_run_on_onnx_runtime_and_pass_the_check(exported):
    model, folder, options = exported
    checks = llava_fp8.check_fp8_graphs(model, folder, options)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert set().union(*(set(c["quantized_layers"]) for c in checks.values())) <= fp8
    for name, check in checks.items():
        assert check["ran"] and check["cases"] > 0 and check["fp8_gemms"] > 0, name
        assert check["fp8_gemm_rel_l2_max"] <= check["gemm_limit_rel_l2"]
    assert checks["vision"]["fp8_gemms"] == 6 * model.config.vision_depth + 2
    assert checks["decode"]["cases"] == 4  # two steps of each check case


def _producers(model: onnx.ModelProto) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def test_a_wrong_weight_scale_fails_the_check_naming_the_layer(exported, tmp_path):
    model, folder, options = exported
    planted = Path(shutil.copytree(folder, tmp_path / "onnx"))
    expected = llava_fp8.fp8_weight_names(model, model.config, options.dtype)["prefill"]
    weight, layer = next((w, n) for w, n in expected.items() if n.endswith("mlp.down_proj"))
    graph = onnx.load(str(planted / "prefill.onnx"))
    dq = next(
        n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weight
    )
    scale = next(t for t in graph.graph.initializer if t.name == dq.input[1])
    value = numpy_helper.to_array(scale) * np.float16(1.3)
    scale.CopyFrom(numpy_helper.from_array(value.astype(np.float16), scale.name))
    onnx.save(graph, str(planted / "prefill.onnx"), save_as_external_data=True, location="p.data")
    with pytest.raises(MllamaExportError, match="prefill.onnx") as err:
        llava_fp8.check_fp8_graphs(model, planted, options)
    assert layer in str(err.value)


def _artifacts(folder: Path, weights, options: BuildOptions, entry: dict) -> Path:
    """What sensitivity reads of an fp8 build: its manifest (the checkpoint it was built from,
    the limits, the quantization entry); the graphs themselves are not run."""
    from mllama_export.engines.manifest_read import FORMAT, MANIFEST

    folder.mkdir()
    manifest = {
        "format": FORMAT,
        "model": {
            "kind": "checkpoint",
            "source": str(weights.folder),
            "checkpoint": str(weights.folder),
            "config": weights.config.to_hf_dict(),
        },
        "precision": "fp8",
        "io_dtype": "float16",
        "limits": {
            "max_batch": LIMITS.max_batch,
            "max_seq_len": LIMITS.max_seq_len,
            "max_images": 2,
        },
        "graphs": {name: {"file": f"onnx/{name}.onnx"} for name in GRAPH_MODULES},
        "files": {},
        "build_options": options.to_json(),
        "quantization": entry,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_sensitivity_ranks_llava_layers_a_miscalibrated_one_first(next_tiny, calibrated, tmp_path):
    from mllama_export.validate.sensitivity import run_sensitivity

    options, _, _, entry = calibrated
    bad = "text.layers.1.mlp.down_proj"
    entry = json.loads(json.dumps(entry))
    entry["layers"][bad]["input_amax"] /= 100  # its inputs saturate: the layer to find
    artifacts = _artifacts(tmp_path / "artifacts", next_tiny, options, entry)
    rep = run_sensitivity(artifacts, layers=["text.layers.1.*", "projector.*"], steps=1)
    labels = [s.label for s in rep.layers]
    assert sorted(labels) == sorted(
        n for n in entry["layers"] if n.startswith(("text.layers.1.", "projector."))
    )
    assert len(labels) == 7 + 2 and labels[0] == bad and rep.complete
    budgets = [s.budget for s in rep.layers]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[1] > 0
    # the projector reads only images: a text-only prompt is left exactly as it was
    projector = next(s for s in rep.layers if s.label.startswith("projector."))
    text_only = [r for r in projector.report.results if r.case == "text-only"]
    assert text_only and all(r.metrics.rel_l2 == 0 for r in text_only)
    assert rep.combined.label == "all 9 layers"
