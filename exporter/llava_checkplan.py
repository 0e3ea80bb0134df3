"""LLaVA's "check" part: what the check against PyTorch runs on, and the memory it needs,
decided before any work (the part's API: exporter/check.py; Mllama's: exporter/checkplan.py).

The check holds PyTorch's whole model and then, graph by graph, ONNX Runtime's float32 copy of
that graph's weights: llava-1.5-7b in fp16 is 14 GB of weights and its text graphs' copy 27 GB,
more than a 24 GB machine has. Where the estimate below does not fit, the check runs on a
reduced copy: the checkpoint's own tensors at the real widths, with its first two text layers,
the CLIP tower's first layers down to what the feature layer needs (same feature-layer
semantics: -2 is still the penultimate layer's output), and the first REDUCED_VOCAB rows of the
vocabulary (the rows of the image, BOS, EOS and pad tokens past them moved to its top rows).
The copy is written as a checkpoint of its own, exported by the same streaming path, and
checked in place of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_contract import GRAPHS
from mllama_export.graphs.llava_model import GRAPH_MODULES, LlavaModel
from mllama_export.graphs.llava_synth import truncated
from mllama_export.graphs.llava_weights import checkpoint_name

from . import checkmemory as shared
from .check import CheckPlan
from .checkmemory import (
    BUDGET_RESERVE,
    BUDGET_SHARE,
    TORCH_REPACK,
    GraphSizes,
    MemoryEstimate,
    available_memory,
    budget,
)
from .options import BuildOptions

__all__ = [
    "BUDGET_RESERVE",
    "BUDGET_SHARE",
    "CHECK_CASES",
    "available_memory",
    "budget",
    "estimate",
    "graph_sizes",
    "plan_check",
    "reduced_copy",
    "refuse_fp8_calibration",
    "write_reduced_checkpoint",
]

# Sizes unlike the traced ones (exporter/llava_build.py EXAMPLE_SIZES: 2, 3, 7, 11, 5), so that
# a dim frozen by mistake shows up; the first case always runs, the second where it fits.
CHECK_CASES = (
    {"batch": 1, "num_tiles": 2, "sequence": 5, "num_logits": 1, "past_sequence": 9},
    {"batch": 3, "num_tiles": 5, "sequence": 4, "num_logits": 4, "past_sequence": 6},
)
REDUCED_TEXT_LAYERS = 2
REDUCED_VOCAB = 4096

# -- memory ----------------------------------------------------------------------------------
#
# The libraries, ONNX Runtime's float32 weights and load-time casts, PyTorch's GEMM repacking
# and the export's largest tensor are every family's constants (exporter/checkmemory.py,
# measured on this machine at Mllama's 11B width with the same torch, onnx and ONNX Runtime):
# they are properties of those libraries, not of the model. What is LLaVA's own is the
# activations below. Measured (VmHWM of a child process per phase, first check case, fp16) on
# the reduced copy of llava-1.5-7b at its real widths: export 0.61 GB (estimate 0.72), PyTorch
# 1.36 GB (1.63), ONNX Runtime 2.26 GB (3.03); on a small 512-wide model the libraries are the
# peak and the estimate is 1.2 to 1.4 times it. Never under: safe, at some cost in depth.
# bytes per attention score alive at once: PyTorch's graph keeps the scores, their float32
# softmax and the weighted copy together; ONNX Runtime three to four float32 buffers of them
SCORE_BYTES_TORCH = {2: 10, 4: 12}
SCORE_BYTES_ORT = 14


def graph_sizes(config: LlavaConfig) -> GraphSizes:
    with torch.device("meta"):
        model = LlavaModel(config)
    return shared.parameter_sizes(model, GRAPH_MODULES)


def _vision_run(config: LlavaConfig, tiles: int, itemsize: int, score_bytes: int) -> int:
    """One vision run: one layer's attention scores, the states around it, every hidden state
    the tower keeps for its feature layers, and the projector's output."""
    v, t = config.vision, config.text
    seq = v.num_positions
    scores = v.num_heads * seq * seq * score_bytes
    states = seq * (10 * v.hidden_size + 2 * v.intermediate_size) * itemsize
    kept = seq * v.hidden_size * (config.vision_depth + 1) * itemsize
    projected = config.tile_tokens * (config.feature_dim + 3 * t.hidden_size) * itemsize
    return tiles * (scores + states + kept + projected)


def _text_run(config: LlavaConfig, sizes: dict[str, int], itemsize: int, decode: bool) -> int:
    """One prefill or decode run: the image features spliced in, the scores, the KV cache in
    and out, one layer's states, the logits at the asked positions (and their float32 copy)."""
    t = config.text
    b, s = sizes["batch"], 1 if decode else sizes["sequence"]
    past = sizes["past_sequence"] if decode else 0
    kv_row = 2 * t.num_kv_heads * t.head_dim * itemsize
    features = 0 if decode else 2 * sizes["num_tiles"] * config.tile_tokens * t.hidden_size
    scores = b * t.num_heads * s * (past + s) * 10
    cache = t.num_layers * b * (past + s) * kv_row * 2
    states = b * s * (8 * t.hidden_size + 3 * t.intermediate_size) * 4
    logits = b * (1 if decode else min(sizes["num_logits"], s)) * t.vocab_size * (4 + itemsize)
    return features * itemsize + scores + cache + states + logits


def run_bytes(
    config: LlavaConfig, graph: str, sizes: dict[str, int], itemsize: int, onnxruntime: bool
) -> int:
    """Activation bytes of one run of ``graph`` at ``sizes``, in PyTorch or ONNX Runtime
    (which computes 16-bit graphs in float32 on the CPU)."""
    size = 4 if onnxruntime else itemsize
    if graph == "vision":
        score = SCORE_BYTES_ORT if onnxruntime else SCORE_BYTES_TORCH[min(itemsize, 4)]
        return _vision_run(config, sizes["batch"] * sizes["num_tiles"], size, score)
    run = _text_run(config, sizes, size, graph == "decode")
    if not onnxruntime:  # PyTorch's CPU matmul repacks the weight it multiplies (lm_head)
        t = config.text
        run += int(t.vocab_size * t.hidden_size * itemsize * TORCH_REPACK[itemsize])
    return run


def estimate(
    config: LlavaConfig,
    precision: str,
    cases: dict[str, list[dict[str, int]]],
    sizes: GraphSizes | None = None,
) -> MemoryEstimate:
    """Peak memory of the export and of the check on ``cases`` (per graph), for ``config``."""
    return _sizing().estimate(config, precision, cases, sizes)


def _sizing() -> shared.Sizing:
    # built when asked, so that it holds this module's functions and cases as they are then
    return shared.Sizing(
        graph_sizes,
        run_bytes,
        reduced_copy,
        GRAPHS,
        CHECK_CASES,
        cause="ONNX Runtime's float32 copy of the largest graph at this width",
    )


# -- the reduced copy ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReducedCopy:
    """A smaller LLaVA made of the checkpoint's own first layers and vocabulary rows: the
    copy's tensor names are a subset of the model's (layer i is layer i), only the vocabulary
    tensors lose rows."""

    config: LlavaConfig
    full: LlavaConfig
    moved: tuple[int, ...]  # the full model's token ids whose rows close the copy's vocabulary

    def rows(self) -> list[tuple[int, int]]:
        """The (start, stop) row ranges of the full vocabulary the copy's rows are, in order."""
        kept = self.config.text.vocab_size - len(self.moved)
        return [(0, kept), *((i, i + 1) for i in self.moved)]

    def tensor(self, checkpoint, name: str) -> torch.Tensor:
        """The copy's tensor ``name``, read from ``checkpoint`` (of the full model)."""
        if name in ("text.embed_tokens.weight", "text.lm_head.weight") and self.reduces_vocab:
            return torch.cat([checkpoint.rows(name, a, b) for a, b in self.rows()])
        return checkpoint.read(name)

    @property
    def reduces_vocab(self) -> bool:
        return self.config.text.vocab_size < self.full.text.vocab_size

    def kept_amax(self, amax: dict[str, float]) -> dict[str, float]:
        """The full model's calibrated FP8 input amax of the layers the copy holds (their
        names are the same)."""
        with torch.device("meta"):
            names = {n for n, _ in LlavaModel(self.config).named_modules()}
        return {n: a for n, a in amax.items() if n in names}

    def describe(self) -> str:
        t, full = self.config.text, self.full
        return (
            f"reduced copy at the real widths: the first {t.num_layers} of "
            f"{full.text.num_layers} text layers, the first {self.config.vision_depth} of "
            f"{full.vision_depth} CLIP layers that run (feature layer "
            f"{self.config.vision_feature_layer}, as the model's), the first "
            f"{t.vocab_size - len(self.moved):,} of {full.text.vocab_size:,} vocabulary rows"
            + (f" and the rows of tokens {list(self.moved)}" if self.moved else "")
            + "; the checkpoint's own weights"
        )


def reduced_vision_layers(config: LlavaConfig) -> int:
    """The fewest CLIP layers that keep every feature layer's meaning: a positive index needs
    that many layers, a negative -k at least k (so that it still counts from the top, and -2
    is one run layer below the top, as in the model); at least 2."""
    layer = config.vision_feature_layer
    layers = (layer,) if isinstance(layer, int) else layer
    need = max(2, *(i if i >= 0 else -i for i in layers))
    return min(config.vision.num_layers, need)


def reduced_copy(config: LlavaConfig) -> ReducedCopy:
    """The first REDUCED_TEXT_LAYERS text layers, the CLIP layers the feature layer needs, the
    first REDUCED_VOCAB vocabulary rows; the special tokens past them move to its top rows."""
    text_layers = min(config.text.num_layers, REDUCED_TEXT_LAYERS)
    small = truncated(config, text_layers, reduced_vision_layers(config))
    vocab = min(config.text.vocab_size, REDUCED_VOCAB)
    if vocab == config.text.vocab_size:
        return ReducedCopy(small, config, ())
    moved = tuple(sorted(i for i in _special_ids(config) if vocab <= i))
    new = dict(zip(moved, range(vocab - len(moved), vocab), strict=True))
    t = small.text

    def at(i):
        return None if i is None else new.get(i, i)

    text = replace(
        t,
        vocab_size=vocab,
        bos_token_id=at(t.bos_token_id),
        eos_token_ids=tuple(at(i) for i in t.eos_token_ids),
        pad_token_id=at(t.pad_token_id),
    )
    small = replace(
        small,
        text=text,
        image_token_id=at(config.image_token_id),
        pad_token_id=at(small.pad_token_id),
    )
    return ReducedCopy(small, config, moved)


def _special_ids(config: LlavaConfig) -> set[int]:
    t = config.text
    ids = {config.image_token_id, t.bos_token_id, *t.eos_token_ids, t.pad_token_id}
    return {i for i in ids | {config.pad_token_id} if i is not None}


def write_reduced_checkpoint(checkpoint, copy: ReducedCopy, out: Path) -> Path:
    """The copy as a checkpoint folder of its own (config.json and its tensors under the
    llava-hf names, read from ``checkpoint`` one at a time), in shards of about 512 MB."""
    import json

    from safetensors.torch import save_file

    out.mkdir(parents=True)
    with torch.device("meta"):
        names = list(LlavaModel(copy.config).state_dict())
    names = [n for n in names if n in checkpoint.tensors]  # not the rope buffers
    shard, filled, files = {}, 0, {}
    for i, name in enumerate(names):
        tensor = copy.tensor(checkpoint, name)
        shard[checkpoint_name(name)] = tensor.contiguous()
        filled += tensor.numel() * tensor.element_size()
        if filled >= 512 << 20 or i == len(names) - 1:
            file = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, out / file, metadata={"format": "pt"})
            files.update(dict.fromkeys(shard, file))
            shard, filled = {}, 0
    index = {"metadata": {}, "weight_map": dict(sorted(files.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(copy.config.to_hf_dict(), indent=2) + "\n")
    return out


# -- the decision ----------------------------------------------------------------------------


def plan_check(
    options: BuildOptions, config: LlavaConfig, available: int | None = None
) -> CheckPlan:
    """The deepest check that fits in ``available`` bytes (default: what the machine has
    now), as ``options.check_depth`` allows; refused up front when none fits."""
    available = available_memory() if available is None else available
    return shared.plan_check(options, config, available, _sizing())


# -- FP8 calibration ---------------------------------------------------------------------------


def calibration_memory(config: LlavaConfig) -> int:
    """Bytes FP8 calibration needs at least: the largest unit it loads (one layer at a time,
    exporter/llava_layerwise.py), in float32, plus the headroom."""
    t, v = config.text, config.vision
    vocab = t.vocab_size * t.hidden_size
    text_layer = (
        3 * t.hidden_size * t.intermediate_size
        + (2 * t.num_heads + 2 * t.num_kv_heads) * t.head_dim * t.hidden_size
    )
    vision_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    projector = config.feature_dim * t.hidden_size + t.hidden_size**2
    return 4 * max(vocab, text_layer, vision_layer, projector) + shared.CALIBRATION_HEADROOM


def refuse_fp8_calibration(
    options: BuildOptions, config: LlavaConfig, available: int | None = None
) -> None:
    """Refused up front only where even one layer (and the headroom) does not fit."""
    if options.precision == "fp8":
        available = available_memory() if available is None else available
        shared.refuse_calibration(calibration_memory(config), available)
