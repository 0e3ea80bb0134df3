"""Shared fixtures: synthetic checkpoints written once per session, and their models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mllama_export.engines.backend import TorchBackend
from mllama_export.engines.inputs import prompt_feed
from mllama_export.engines.preprocess import PreprocessedImages
from mllama_export.engines.runner import Limits, Runner
from mllama_export.exporter.build import build
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.config import preset
from mllama_export.graphs.model import DecodeGraph, MllamaModel, PrefillGraph, VisionGraph
from mllama_export.graphs.synth import write_checkpoint, write_side_files
from mllama_export.graphs.weights import load_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_checkpoint(preset("tiny"), tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf(tiny_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.MllamaForConditionalGeneration.from_pretrained(
        tiny_dir, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_dir) -> MllamaModel:
    return load_model(tiny_dir, semantics="hf")


@pytest.fixture(scope="session")
def tiny_model_meta(tiny_dir) -> MllamaModel:
    return load_model(tiny_dir, semantics="meta")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tiny_hf):
    """A checkpoint the tests did not write: transformers' own save_pretrained, sharded."""
    out = tmp_path_factory.mktemp("hf-saved")
    tiny_hf.save_pretrained(out, max_shard_size="300KB")
    write_side_files(preset("tiny"), out)  # tokenizer and preprocessor config
    return out


@pytest.fixture(scope="session")
def ort_artifacts(tmp_path_factory, hf_checkpoint):
    out = tmp_path_factory.mktemp("artifacts") / "tiny-hf"
    build(
        BuildOptions(model=str(hf_checkpoint), out=out, xattn_mask="hf", max_batch=4),
    )
    return out


@pytest.fixture(scope="session")
def fp8_dir(tmp_path_factory) -> Path:
    """tiny in FP8 with the default weight scheme (per-tensor), built once per session."""
    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    return build(BuildOptions(model="tiny", out=out, precision="fp8"))


@pytest.fixture(scope="session")
def fp8c_dir(tmp_path_factory) -> Path:
    """tiny in FP8 with per-channel weight scales."""
    out = tmp_path_factory.mktemp("fp8c") / "tiny-fp8c"
    options = BuildOptions(model="tiny", out=out, precision="fp8", fp8_weights="per-channel")
    return build(options)


def load_script(name: str):
    """A benchmarks/ script as a module (they are not part of the package)."""
    import importlib.util
    import sys

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass in it looks itself up there
    spec.loader.exec_module(module)
    return module


def torch_runner(model: MllamaModel, limits: Limits | None = None) -> Runner:
    return Runner(
        model.config,
        {
            "vision": TorchBackend(VisionGraph(model)),
            "prefill": TorchBackend(PrefillGraph(model)),
            "decode": TorchBackend(DecodeGraph(model)),
        },
        limits or Limits(max_batch=8, max_seq_len=256, max_images=2),
    )


def random_images(config, tiles_per_prompt: list[list[int]], seed: int = 0) -> PreprocessedImages:
    """Random pixel tiles with the aspect-ratio ids and masks the processor would give."""
    v = config.vision
    rng = np.random.default_rng(seed)
    b, n = len(tiles_per_prompt), max((len(t) for t in tiles_per_prompt), default=0)
    pixels = np.zeros(
        (b, n, v.max_num_tiles, v.num_channels, v.image_size, v.image_size), np.float32
    )
    ids = np.zeros((b, n), np.int64)
    mask = np.zeros((b, n, v.max_num_tiles), np.int64)
    mask[:, :, 0] = 1  # the processor marks the first tile of padding images too
    for row, ratios in enumerate(tiles_per_prompt):
        for i, ratio_id in enumerate(ratios):
            h, w = v.supported_aspect_ratios[ratio_id - 1]
            pixels[row, i, : h * w] = rng.standard_normal((h * w, *pixels.shape[3:]))
            ids[row, i] = ratio_id
            mask[row, i, : h * w] = 1
    tiles = [
        [int(np.prod(v.supported_aspect_ratios[r - 1])) for r in ratios]
        for ratios in tiles_per_prompt
    ]
    return PreprocessedImages(pixels, ids, mask, tiles)


def hf_inputs(runner: Runner, prompts, images) -> dict:
    """transformers' inputs for what the runner feeds: the same left-padded ids and masks."""
    feed = prompt_feed(runner.config, prompts, images)
    kwargs = {
        "input_ids": torch.from_numpy(feed["input_ids"]),
        "attention_mask": torch.from_numpy(feed["attention_mask"]),
    }
    if images is not None:
        kwargs.update(
            pixel_values=torch.from_numpy(images.pixel_values),
            aspect_ratio_ids=torch.from_numpy(images.aspect_ratio_ids),
            aspect_ratio_mask=torch.from_numpy(images.aspect_ratio_mask),
            cross_attention_mask=torch.from_numpy(feed["cross_attention_mask"]),
        )
    return kwargs


def hf_generate(hf, runner: Runner, prompts, images, n: int) -> list[list[int]]:
    """transformers' greedy generate, exactly n new tokens per prompt."""
    inputs = hf_inputs(runner, prompts, images)
    out = hf.generate(
        **inputs,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=hf.config.text_config.pad_token_id,
    )
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def write_evalset(folder: Path, lines: list[str]) -> Path:
    """A user evaluation folder: ``prompts.jsonl`` of ``lines`` and two images, wide.png and
    tall.png."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (70, 30, 3), dtype=np.uint8)).save(folder / "tall.png")
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder
