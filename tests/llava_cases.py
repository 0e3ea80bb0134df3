"""LLaVA test checkpoints that the tests do not write themselves: transformers builds the model
from a config unlike the presets, every parameter is randomized, and `save_pretrained` writes
it sharded. Built once per process; plus the greedy chaining loop over our three graphs."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mllama_export.engines.llava_text import left_pad
from mllama_export.graphs.checkpoint import load_model
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_layout import build_image_layout, decode_attention_mask, image_tiles
from mllama_export.graphs.llava_model import LlavaModel

IMAGE_TOKEN = 300
PAD = 1
REL_L2 = 1e-5

# LLaVA 1.5 shape: Llama text with GQA 6:2 and linear rope scaling, a tied head, a CLIP tower of 5
# heads whose features come from two layers (a list, out of order, one negative) with the class
# token kept ("full"), a bias-free projector with SiLU.
LLAVA_CASE = dict(
    model_type="llava",
    text_config=dict(
        model_type="llama",
        vocab_size=320,
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=160,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=PAD,
    ),
    vision_config=dict(
        model_type="clip_vision_model",
        hidden_size=40,
        num_hidden_layers=4,
        num_attention_heads=5,
        intermediate_size=72,
        image_size=42,
        patch_size=14,
    ),
    image_token_index=IMAGE_TOKEN,
    vision_feature_layer=[-2, 1],
    vision_feature_select_strategy="full",
    projector_hidden_act="silu",
    multimodal_projector_bias=False,
)
# LLaVA-NeXT shape: Mistral text with one KV head and a sliding window shorter than every
# prompt, a 3-head tower read at its last layer, pinpoints portrait, landscape, square, one
# tile and very wide.
NEXT_PINPOINTS = [[56, 28], [28, 56], [56, 56], [28, 28], [28, 112]]
NEXT_CASE = dict(
    model_type="llava_next",
    text_config=dict(
        model_type="mistral",
        vocab_size=330,
        hidden_size=80,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=144,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
        sliding_window=7,
        rms_norm_eps=1e-6,
        pad_token_id=PAD,
    ),
    vision_config=dict(
        model_type="clip_vision_model",
        hidden_size=24,
        num_hidden_layers=3,
        num_attention_heads=3,
        intermediate_size=48,
        image_size=28,
        patch_size=14,
    ),
    image_token_index=IMAGE_TOKEN,
    vision_feature_layer=-1,
    vision_feature_select_strategy="default",
    image_grid_pinpoints=NEXT_PINPOINTS,
)
CASES = {"llava": LLAVA_CASE, "llava_next": NEXT_CASE}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, at scales that keep activations of order one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed" in name or "newline" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:]) or p.shape[0]))


@dataclass
class Case:
    folder: Path
    hf: torch.nn.Module
    ours: LlavaModel

    @property
    def config(self) -> LlavaConfig:
        return self.ours.config


@functools.cache
def _built(kind: str, root: Path) -> Case:
    import transformers

    cls = {"llava": transformers.LlavaConfig, "llava_next": transformers.LlavaNextConfig}[kind]
    model_cls = {
        "llava": transformers.LlavaForConditionalGeneration,
        "llava_next": transformers.LlavaNextForConditionalGeneration,
    }[kind]
    torch.manual_seed(0)
    hf = model_cls(cls(**CASES[kind])).eval()
    randomize(hf, seed=len(kind))
    folder = root / kind
    hf.save_pretrained(folder, max_shard_size="40KB")
    return Case(folder, hf, load_model(folder))


def built(kind: str, tmp_path_factory) -> Case:
    root = Path(tmp_path_factory.getbasetemp()) / "llava-cases"
    root.mkdir(exist_ok=True)
    return _built(kind, root)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_tiles(config: LlavaConfig, image_sizes: list[list[tuple[int, int]]], seed: int):
    """Pixel tiles of the right count for the images of a batch, in prompt order."""
    rng = np.random.default_rng(seed)
    v = config.vision
    n = sum(image_tiles(config, s) for row in image_sizes for s in row)
    return rng.standard_normal((n, v.num_channels, v.image_size, v.image_size)).astype(np.float32)


def hf_inputs(config: LlavaConfig, batch: dict, pixels: np.ndarray, image_sizes) -> dict:
    """transformers' inputs for the same padded ids and tiles."""
    kwargs = {
        "input_ids": torch.from_numpy(batch["input_ids"]),
        "attention_mask": torch.from_numpy(batch["attention_mask"]),
    }
    sizes = [s for row in image_sizes for s in row]
    if not sizes:
        return kwargs
    if not config.is_next:
        kwargs["pixel_values"] = torch.from_numpy(pixels)
        return kwargs
    # NeXT: [images, most tiles, C, H, W], zero-padded, with image_sizes
    counts = [image_tiles(config, s) for s in sizes]
    padded = np.zeros((len(sizes), max(counts), *pixels.shape[1:]), np.float32)
    start = 0
    for i, n in enumerate(counts):
        padded[i, :n] = pixels[start : start + n]
        start += n
    kwargs.update(pixel_values=torch.from_numpy(padded), image_sizes=torch.tensor(sizes))
    return kwargs


Run = Callable[[str, dict[str, np.ndarray]], list[np.ndarray]]


def torch_runner(model: LlavaModel) -> Run:
    from mllama_export.graphs.llava_model import GRAPH_CLASSES

    graphs = {name: cls(model) for name, cls in GRAPH_CLASSES.items()}

    def run(name: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        graph = graphs[name]
        args = [torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in graph.INPUTS]
        with torch.no_grad():
            out = graph(*args)
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run


def prefill_feed(config, rows, image_sizes, pixels, run: Run, positions=None) -> tuple[dict, dict]:
    batch = left_pad(rows, PAD)
    tiles = len(pixels)
    if tiles:
        features = run("vision", {"pixel_values": pixels})[0]
    else:
        features = np.zeros((0, config.tile_tokens, config.text.hidden_size), np.float32)
    s = batch["input_ids"].shape[1]
    feed = {
        **batch,
        "image_features": features,
        "image_layout": build_image_layout(batch["input_ids"], image_sizes, config),
        "logit_positions": np.arange(s) if positions is None else np.asarray(positions),
    }
    return batch, feed


def _argmax(logits: np.ndarray, config: LlavaConfig) -> np.ndarray:
    # exactly `steps` tokens, as generate(min_new_tokens=steps) picks them: never an EOS
    return np.where(
        np.isin(np.arange(logits.shape[-1]), config.text.eos_token_ids), -np.inf, logits
    ).argmax(-1)


def greedy(config, rows, image_sizes, pixels, run: Run, steps: int, forced=None):
    """Prefill + decode chained, argmax each step: (tokens [B, steps], logits [steps, B, V]);
    `forced` ([steps, B]): those tokens fed instead, as the gate's teacher forcing does."""
    batch, feed = prefill_feed(config, rows, image_sizes, pixels, run)
    s = batch["input_ids"].shape[1]
    feed["logit_positions"] = np.array([s - 1])
    logits, keys, values = run("prefill", feed)
    mask, pos = batch["attention_mask"], batch["position_ids"][:, -1:]
    step_logits = [logits[:, -1]]
    pick = (lambda i: _argmax(step_logits[-1], config)) if forced is None else forced.__getitem__
    tokens = [pick(0)]
    for step in range(steps - 1):
        pos = pos + 1
        decode = {
            "input_ids": tokens[-1][:, None].astype(np.int64),
            "position_ids": pos,
            "attention_mask": decode_attention_mask(mask, s + step, config.text.sliding_window),
            "past_key": keys,
            "past_value": values,
        }
        logits, new_k, new_v = run("decode", decode)
        keys, values = np.concatenate((keys, new_k), 3), np.concatenate((values, new_v), 3)
        mask = np.concatenate((mask, np.ones_like(mask[:, :1])), 1)
        step_logits.append(logits[:, 0])
        tokens.append(pick(step + 1))
    return np.stack(tokens, 1), np.stack(step_logits)


def hf_generate(hf, config: LlavaConfig, rows, image_sizes, pixels, steps: int):
    """transformers' greedy generate: (tokens [B, steps], logits [steps, B, V])."""
    batch = left_pad(rows, PAD)
    inputs = hf_inputs(config, batch, pixels, image_sizes)
    with torch.no_grad():
        out = hf.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=PAD,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, batch["input_ids"].shape[1] :].numpy()
    return tokens, torch.stack(out.logits).numpy()


def export_onnx(graph: torch.nn.Module, config: LlavaConfig, path: Path) -> Path:
    """torch.onnx.export (dynamo) of one graph, with the contract's names and dynamic dims."""
    import logging
    import warnings

    from mllama_export.exporter.llava_build import example_inputs, export_dims
    from mllama_export.graphs.llava_contract import dynamic_axes

    dims = export_dims(config)
    args = example_inputs(graph.INPUTS, config, torch.float32)
    shapes = {s.name: {i: dims[d] for i, d in dynamic_axes(s).items()} for s in graph.INPUTS}
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph.eval(),
            args,
            input_names=[s.name for s in graph.INPUTS],
            output_names=[s.name for s in graph.OUTPUTS],
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))
    return path


def onnx_runner(folder: Path) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {
        name: ort.InferenceSession(str(folder / f"{name}.onnx"), options, ["CPUExecutionProvider"])
        for name in ("vision", "prefill", "decode")
    }

    def run(name: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = sessions[name]
        return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})

    return run


# -- artifact folders: the three graphs exported as above, with a manifest the runner reads ----

# What the test artifacts are built for: a padded batch of 5 (every pinpoint at once)
ARTIFACT_LIMITS = {"max_batch": 5, "max_seq_len": 256, "max_images": 2}
RESOURCE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
)


def write_artifacts(model: LlavaModel, checkpoint: Path, out: Path) -> Path:
    """The graphs of `model` (fp32), the checkpoint's tokenizer and processor files where it
    has them, and a manifest.json as `mllama-export build` lays it out, hashes included."""
    import json
    import shutil

    from mllama_export.engines.manifest_read import FORMAT, sha256
    from mllama_export.graphs.llava_model import GRAPH_CLASSES

    out.mkdir(parents=True)
    for name, cls in GRAPH_CLASSES.items():
        export_onnx(cls(model), model.config, out / f"{name}.onnx")
    for name in RESOURCE_FILES:
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, out / name)
    files = {p.name: sha256(p) for p in sorted(out.iterdir())}
    manifest = {
        "format": FORMAT,
        "model": {"config": json.loads((checkpoint / "config.json").read_text())},
        "precision": "fp32",
        "io_dtype": "float32",
        "limits": ARTIFACT_LIMITS,
        "graphs": {name: {"file": f"{name}.onnx"} for name in GRAPH_CLASSES},
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@functools.cache
def _artifacts(kind: str, root: Path) -> Path:
    import shutil

    from mllama_export.graphs.llava_synth_files import write_llava_processor

    case = _built(kind, root)
    # config.json and the processor files of the llava-hf layout (no tokenizer: the cases'
    # vocabularies are not the synthetic tokenizer's)
    resources = root / f"resources-{kind}"
    resources.mkdir()
    shutil.copy(case.folder / "config.json", resources)
    write_llava_processor(case.config, resources)
    return write_artifacts(case.ours, resources, root / f"artifacts-{kind}")


def artifacts(kind: str, tmp_path_factory) -> Path:
    """The artifact folder of `built(kind)`, exported once per process."""
    root = Path(tmp_path_factory.getbasetemp()) / "llava-cases"
    root.mkdir(exist_ok=True)
    return _artifacts(kind, root)
