"""LLaVA's "fp8" part: `--precision fp8` for LLaVA 1.5 and LLaVA-NeXT.

The same explicit quantization as Mllama's (exporter/fp8.py, graphs/quant.py): Q/DQ
(float8e4m3fn) around every quantized GEMM in the ONNX graphs, everything else in float16.
Quantized by default: every decoder layer's q/k/v/o projections and its MLP (gate/up/down),
which run in the prefill and decode graphs; never the embedding, lm_head or norms.
``--fp8-vision`` adds the CLIP tower's attention and MLP linears and the projector, so that
the vision graph is FP8 too (without it the vision graph is an ordinary float16 one).

Calibration runs the built-in evaluation set (engines/llava_evalset.py: text only, one and
two images, a padded batch and, for NeXT, every pinpoint) or a user's prompts.jsonl through
our float32 graphs, layer by layer from the checkpoint (exporter/llava_layerwise.py): never
the whole model in memory, and the scales of the whole model bit for bit.

The build's check (exporter/fp8_check.py) runs each graph on ONNX Runtime against the model
quantized as the artifacts hold it, every GEMM's output shared, on inputs real prompts
produce (:func:`check_feeds`). The API is exporter/fp8.py's (its docstring lists it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mllama_export.engines.backend import TorchBackend
from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_model import GRAPH_MODULES, LlavaModel
from mllama_export.graphs.progress import step
from mllama_export.graphs.quant import quantizable_linears, quantize_model

from .calibration import CALIBRATION_STEPS, calibrate_layerwise
from .fp8_check import check_fp8_graph
from .fp8_common import (
    ORT_OPTIMIZATION,
    Recorder,
    check_graphs,
    graph_weight_names,
    input_amax,
    load_quantized_model,
    meta_twin,
    quantization_entry,
)
from .llava_layerwise import LazyModel, computed_buffers
from .options import BuildOptions

__all__ = [
    "ORT_OPTIMIZATION",
    "calibration_cases",
    "check_feeds",
    "check_fp8_graph",
    "check_fp8_graphs",
    "fp8_layers",
    "fp8_layout",
    "fp8_weight_names",
    "input_amax",
    "load_fp8_model",
    "load_quantized",
    "quantize_fp8",
]

BUILTIN_SET = "built-in evaluation set (engines/llava_evalset.py build_evalset, seed 0)"
CHECK_STEPS = 3  # tokens generated per check case: the prefill and two decode steps


def _meta_model(config: LlavaConfig) -> LlavaModel:
    with torch.device("meta"):
        return LlavaModel(config).eval()


def fp8_layers(config: LlavaConfig, options: BuildOptions) -> list[str]:
    """The layers ``options`` quantize (module order), from a model on the meta device: an
    --fp8-exclude pattern that matches nothing is refused before any work starts."""
    names = quantizable_linears(_meta_model(config), options.fp8_vision, options.fp8_exclude)
    if not names:
        raise MllamaExportError(
            f"--fp8-exclude {' '.join(options.fp8_exclude)} leaves no layer in FP8; build "
            "with --precision fp16 for that"
        )
    return names


def fp8_layout(
    config: LlavaConfig, options: BuildOptions
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(the layers ``options`` quantize, {graph: {FP8 initializer name: layer name}}), from a
    model on the meta device; a graph with no FP8 layer is an ordinary float16 one."""
    names = fp8_layers(config, options)
    model = _meta_model(config)
    with torch.device("meta"):
        quantize_model(model, dict.fromkeys(names, 1.0), options.dtype, options.fp8_weights)
    return names, fp8_weight_names(model, config, options.dtype)


def fp8_weight_names(model: LlavaModel, config: LlavaConfig, dtype) -> dict[str, dict]:
    """{graph: {FP8 initializer name: layer name}} of a quantized ``model`` (in memory or on
    the meta device), from its graphs run on example inputs on a meta twin of it."""
    on_meta = next(model.parameters()).device.type == "meta"
    twin = model if on_meta else meta_twin(model, lambda: LlavaModel(model.config))
    return graph_weight_names(twin, config, dtype)


def calibration_cases(config: LlavaConfig, options: BuildOptions, checkpoint: Path | None) -> list:
    """The user's calibration folder (prompts.jsonl, tokenized and preprocessed with the
    checkpoint's own tokenizer and processor config), else the built-in evaluation set
    (which needs no ``checkpoint``)."""
    from mllama_export.engines.llava_evalset import build_evalset, read_cases

    if options.calibration is None:
        return build_evalset(config, options.limits, CALIBRATION_STEPS)
    if checkpoint is None:
        raise MllamaExportError(
            f"--calibration {options.calibration} is tokenized with the checkpoint's "
            "tokenizer; expected a checkpoint folder for --model"
        )
    return read_cases(options.calibration, config, checkpoint)


def quantize_fp8(weights, options: BuildOptions, names: Sequence[str], cases: Sequence) -> dict:
    """Calibrates the input scales of the FP8 layers ``names`` on ``cases`` (both from the
    build plan), the float32 model run layer by layer from the checkpoint ``weights``.
    Returns the manifest's ``quantization`` entry."""
    names, cases = list(names), list(cases)
    where = "built-in evaluation set" if options.calibration is None else str(options.calibration)
    with step(
        f"calibrating FP8 scales of {len(names)} linear layers on the {where} "
        f"({len(cases)} cases, float32, one layer at a time)"
    ):
        lazy = LazyModel(weights)
        amax = calibrate_layerwise(lazy, names, cases, options.limits, CALIBRATION_STEPS)
    return quantization_entry(names, amax, cases, options, BUILTIN_SET, CALIBRATION_STEPS)


def load_quantized(weights, options: BuildOptions, amax: dict[str, float]) -> LlavaModel:
    """`load_fp8_model` as the build's options ask for it."""
    return load_fp8_model(weights, amax, options.dtype, options.fp8_weights)


def load_fp8_model(weights, amax: dict[str, float], dtype: torch.dtype, scheme: str) -> LlavaModel:
    """The quantized model of the checkpoint ``weights`` as the artifacts hold it (FP8Linears
    with the calibrated ``amax``, the rest in ``dtype``), read tensor by tensor."""
    model = _meta_model(weights.config)
    buffers = computed_buffers(weights.config)
    return load_quantized_model(weights, model, amax, dtype, scheme, buffers)


def check_cases(config: LlavaConfig, limits: Limits) -> list:
    """Inputs at sizes unlike the traced ones: one prompt with one image (batch 1), and a
    left-padded batch of up to 3 rows (text only, text before its image, an image first);
    cases longer than the artifacts' max_seq_len are left out."""
    from mllama_export.engines.llava_evalset import _CaseMaker, _image_sizes

    maker, sizes = _CaseMaker(config, 7, limits), _image_sizes(config)
    rows = [((5,), ()), ((4, 3), (0,)), ((1, 6), (1,))]
    cases = [
        maker.case("check-image", [((3, 5), (2,))], sizes),
        maker.case("check-padded", rows, sizes),
    ]
    room = limits.max_seq_len - CHECK_STEPS
    return [c for c in cases if c is not None and max(map(len, c.prompts)) <= room]


def check_feeds(model: LlavaModel, limits: Limits, dtype: torch.dtype) -> dict[str, list]:
    """{graph: [feeds]} of the check cases generated greedily by ``model`` (PyTorch, the
    build's precision): every vision call and prefill, and two decode steps of each case."""
    rec = {name: Recorder(TorchBackend(cls(model))) for name, cls in GRAPH_MODULES.items()}
    runner = Runner(model.config, rec, limits, str(dtype).removeprefix("torch."))
    cases = check_cases(model.config, limits)
    if not cases:
        raise MllamaExportError(
            f"the FP8 check's prompts need more than max_seq_len {limits.max_seq_len} tokens; "
            "expected artifacts that hold a prompt with one image"
        )
    feeds: dict[str, list] = {name: [] for name in GRAPH_MODULES}
    for case in cases:
        before = {name: len(r.feeds) for name, r in rec.items()}
        with torch.inference_mode():
            runner.generate_ids(case.prompts, case.images, CHECK_STEPS, stop_tokens=set())
        for name, r in rec.items():
            new = r.feeds[before[name] :]
            feeds[name] += new[:2] if name == "decode" else new
    return feeds


def check_fp8_graphs(model: LlavaModel, folder: Path, options: BuildOptions) -> dict[str, dict]:
    """Checks the FP8 graphs in ``folder`` against ``model`` (load_fp8_model): structure and
    values, then the numbers on the check cases' inputs with every GEMM output shared.
    Returns {graph: check entry} with the quantized layers of each."""
    feeds = check_feeds(model, options.limits, options.dtype)
    expected = fp8_weight_names(model, model.config, options.dtype)
    return check_graphs(model, folder, options, expected, feeds)
