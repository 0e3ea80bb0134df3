"""What the check against PyTorch runs on, and the memory it needs: decided before any work.

The check (exporter/verify.py) needs PyTorch's model and then, graph by graph, ONNX
Runtime's copy of that graph's weights, plus each run's activations. At the real widths one
image's vision attention alone is gigabytes, so the estimate below counts weights and
activations per phase and per check case, and ``plan_check`` picks the deepest check that fits
the memory there is: the whole model ("full"), else a reduced copy, else it refuses up front.

The reduced copy keeps every kind of layer at the real widths with the checkpoint's own
weights, and little else: one self-attention layer and the first cross-attention layer of
the text decoder, one local and one global vision layer, and the first REDUCED_VOCAB rows of
the vocabulary (plus the 8 rows past it that hold <|image|>). It is written as a checkpoint of
its own, exported by the same streaming path, and checked in place of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.contract import GRAPH_NAMES
from mllama_export.graphs.model import GRAPH_MODULES, MllamaModel

from . import checkmemory as shared
from .check import CheckPlan
from .checkmemory import (  # noqa: F401  (names of this part's API, read by the build and tests)
    BUDGET_RESERVE,
    BUDGET_SHARE,
    CALIBRATION_HEADROOM,
    TORCH_REPACK,
    GraphSizes,
    MemoryEstimate,
    available_memory,
    budget,
)
from .options import BuildOptions

# Shapes unlike the traced ones (mllama_build.EXAMPLE_SIZES), so that a dim frozen by mistake
# shows up; the first case differs from them in every dynamic dim and always runs, the
# second runs where it fits (six images of vision attention at the 11B width do not).
CHECK_CASES = (
    {"batch": 1, "num_images": 1, "sequence": 5, "num_logits": 1, "past_sequence": 9},
    {"batch": 3, "num_images": 2, "sequence": 4, "num_logits": 4, "past_sequence": 6},
)
REDUCED_VOCAB = 4096

# -- memory ----------------------------------------------------------------------------------
#
# The libraries' constants and the budget are every family's: exporter/checkmemory.py.
# bytes per attention score alive at once in one vision layer: PyTorch's graph keeps the
# scaled scores, their float32 copy and the masked copy together (layers.grouped_attention);
# ONNX Runtime's CPU provider keeps three to four float32 buffers of them (the attention in
# TensorRT's fusable form: scores, masked, softmax), 16-bit graphs included,
SCORE_BYTES_TORCH = {2: 10, 4: 8}
SCORE_BYTES_ORT = 14


def graph_sizes(config: MllamaConfig) -> GraphSizes:
    with torch.device("meta"):
        model = MllamaModel(config)
    return shared.parameter_sizes(model, GRAPH_MODULES)


def _vision_run(config: MllamaConfig, images: int, itemsize: int, score_bytes: int) -> int:
    """One vision run of ``images`` images: the attention scores of one layer (the largest
    transient), the hidden states around it, and the taps kept to the end."""
    v = config.vision
    seq = v.max_num_tiles * v.padded_patches
    scores = v.num_heads * seq * seq * score_bytes
    states = seq * (10 * v.hidden_size + 2 * v.intermediate_size) * itemsize
    taps = seq * v.hidden_size * len(v.intermediate_layers) * itemsize
    return images * (scores + states + taps)


def _text_run(config: MllamaConfig, sizes: dict[str, int], itemsize: int, decode: bool) -> int:
    """One prefill or decode run: logits at the positions asked for (16-bit, then float32),
    the cross-attention K/V inputs and scores, the self-attention cache in and out, one
    layer's states."""
    t, v = config.text, config.vision
    b, s = sizes["batch"], sizes.get("new_tokens", 1) if decode else sizes["sequence"]
    past = sizes["past_sequence"] if decode else 0
    image_tokens = sizes["num_images"] * v.max_num_tiles * v.num_patches
    kv_row = 2 * t.num_kv_heads * t.head_dim * itemsize
    cross = len(t.cross_attention_layers) * b * image_tokens * kv_row
    scores = b * t.num_heads * s * (image_tokens + past + s) * 10
    self_cache = len(t.self_attention_layers) * b * (past + s) * kv_row * 2
    states = b * s * (8 * t.hidden_size + 3 * t.intermediate_size) * 4
    logits = b * min(sizes.get("num_logits", 1), s) * t.vocab_size * (4 + itemsize)
    return 2 * cross + scores + self_cache + states + logits


def run_bytes(
    config: MllamaConfig, graph: str, sizes: dict[str, int], itemsize: int, onnxruntime: bool
) -> int:
    """Activation bytes of one run of ``graph`` at ``sizes``, in PyTorch or ONNX Runtime
    (which computes 16-bit graphs in float32 on the CPU)."""
    if graph == "vision":
        score = SCORE_BYTES_ORT if onnxruntime else SCORE_BYTES_TORCH[min(itemsize, 4)]
        size = 4 if onnxruntime else itemsize
        return _vision_run(config, sizes["batch"] * sizes["num_images"], size, score)
    run = _text_run(config, sizes, 4 if onnxruntime else itemsize, graph == "decode")
    if not onnxruntime:  # PyTorch's CPU matmul repacks the weight it multiplies (measured)
        run += int(
            config.text.vocab_size * config.text.hidden_size * itemsize * TORCH_REPACK[itemsize]
        )
    return run


def estimate(
    config: MllamaConfig,
    precision: str,
    cases: dict[str, list[dict[str, int]]],
    sizes: GraphSizes | None = None,
) -> MemoryEstimate:
    """Peak memory of the export and of the check on ``cases`` (per graph), for ``config``."""
    return _sizing().estimate(config, precision, cases, sizes)


def _sizing() -> shared.Sizing:
    # built when asked, so that it holds this module's functions and cases as they are then
    return shared.Sizing(graph_sizes, run_bytes, reduced_copy, GRAPH_NAMES, CHECK_CASES)


# -- the reduced copy ------------------------------------------------------------------------


# Vision tensors with one slice per tile of each aspect ratio: [ratios + 1, tiles * width]
TILE_TENSORS = (
    "vision.gated_positional_embedding.tile_embedding.weight",
    "vision.pre_tile_positional_embedding.embedding.weight",
    "vision.post_tile_positional_embedding.embedding.weight",
)
REDUCED_TILES = 2


@dataclass(frozen=True)
class ReducedCopy:
    """A smaller model made of some of the checkpoint's own layers, rows and tiles."""

    config: MllamaConfig
    source_layers: tuple[int, ...]  # the checkpoint's text layer behind each of the copy's
    full: MllamaConfig

    def source_name(self, name: str) -> str:
        """The checkpoint tensor (our name) that the copy's tensor ``name`` is taken from."""
        prefix = "text.layers."
        if name.startswith(prefix):
            index, *rest = name[len(prefix) :].split(".", 1)
            return ".".join([f"{prefix}{self.source_layers[int(index)]}", *rest])
        return name

    def kept_amax(self, amax: dict[str, float]) -> dict[str, float]:
        """The full model's calibrated FP8 input amax of the layers the copy holds, under the
        copy's names (its text layers are renumbered from 0)."""
        with torch.device("meta"):
            names = [n for n, _ in MllamaModel(self.config).named_modules()]
        return {n: amax[self.source_name(n)] for n in names if self.source_name(n) in amax}

    def tensor(self, checkpoint, name: str) -> torch.Tensor:
        """The copy's tensor ``name``, read from ``checkpoint`` (of the full model)."""
        source, small, full = self.source_name(name), self.config, self.full
        kept, vocab = small.text.vocab_size, full.text.vocab_size
        if name == "text.lm_head.weight":
            return checkpoint.rows(source, 0, kept)
        if name == "text.embed_tokens.weight":  # and the 8 rows past the vocabulary
            rows = (0, kept), (vocab, full.text.embedding_rows)
            return torch.cat([checkpoint.rows(source, a, b) for a, b in rows])
        if name in TILE_TENSORS:  # the first tiles of the first aspect ratios
            rows = checkpoint.rows(source, 0, small.vision.max_aspect_ratio_id + 1)
            width = rows.shape[1] // full.vision.max_num_tiles * small.vision.max_num_tiles
            return rows[:, :width].contiguous()
        return checkpoint.read(source)

    def describe(self) -> str:
        t, v, full = self.config.text, self.config.vision, self.full
        kinds = ["cross-attention" if i in full.text.cross_attention_layers else "self-attention"
                 for i in self.source_layers]  # fmt: skip
        layers = ", ".join(f"{i} ({k})" for i, k in zip(self.source_layers, kinds, strict=True))
        return (
            f"reduced copy at the real widths: text layers {layers} of {full.text.num_layers}, "
            f"{v.num_layers} of {full.vision.num_layers} local and {v.num_global_layers} of "
            f"{full.vision.num_global_layers} global vision layers, {v.max_num_tiles} of "
            f"{full.vision.max_num_tiles} tiles per image, the first {t.vocab_size:,} of "
            f"{full.text.vocab_size:,} vocabulary rows; the checkpoint's own weights"
        )


def reduced_copy(config: MllamaConfig) -> ReducedCopy:
    """The first cross-attention layer and the self-attention layer next to it (the one
    before it, or after it when it is layer 0), in their order; one local and one global
    vision layer; images of up to REDUCED_TILES tiles (the aspect ratios of the original's
    list up to the first that needs more); the first REDUCED_VOCAB vocabulary rows."""
    t, v = config.text, config.vision
    cross = t.cross_attention_layers[0]
    before = [i for i in t.self_attention_layers if i < cross]
    own = before[-1] if before else min(t.self_attention_layers)
    layers = tuple(sorted((own, cross)))
    vocab = min(t.vocab_size, REDUCED_VOCAB)
    tiles = min(v.max_num_tiles, REDUCED_TILES)
    ratios = []
    for h, w in v.supported_aspect_ratios:  # a prefix, so that aspect-ratio ids keep their rows
        if h * w > tiles:
            break
        ratios.append((h, w))
    small = MllamaConfig(
        vision=replace(
            v,
            num_layers=1,
            num_global_layers=1,
            intermediate_layers=tuple(0 for _ in v.intermediate_layers),
            max_num_tiles=tiles,
            supported_aspect_ratios=tuple(ratios),
        ),
        text=replace(
            t,
            num_layers=2,
            cross_attention_layers=(layers.index(cross),),
            vocab_size=vocab,
            **_special_ids(t, vocab),
        ),
        image_token_id=config.image_token_id - t.vocab_size + vocab,
    )
    return ReducedCopy(small, layers, config)


def _special_ids(text, vocab: int) -> dict:
    """BOS, EOS and pad ids for a copy that keeps the first ``vocab`` rows. Llama 3 puts them
    at the top of its vocabulary (128000 and up), past the kept rows, where the check's
    prompts would index rows the copy lacks: they move, in order, to the copy's top rows.
    Those rows hold other tokens' embeddings, which is all the check needs: it compares the
    graphs with PyTorch on the same copy, not with the full model."""
    ids = {text.bos_token_id, *text.eos_token_ids}
    if text.pad_token_id is not None:
        ids.add(text.pad_token_id)
    moved = sorted(i for i in ids if vocab <= i < text.vocab_size)
    new = dict(zip(moved, range(vocab - len(moved), vocab), strict=True))
    pad = text.pad_token_id
    return {
        "bos_token_id": new.get(text.bos_token_id, text.bos_token_id),
        "eos_token_ids": tuple(new.get(i, i) for i in text.eos_token_ids),
        "pad_token_id": None if pad is None else new.get(pad, pad),
    }


def write_reduced_checkpoint(checkpoint, copy: ReducedCopy, out: Path) -> Path:
    """The copy as a checkpoint folder of its own: its config.json and its tensors, read from
    ``checkpoint`` (a graphs.weights.Checkpoint of the full model) one at a time and written
    in shards of about 512 MB."""
    import json

    from safetensors.torch import save_file

    from mllama_export.graphs.weights import checkpoint_name

    out.mkdir(parents=True)
    with torch.device("meta"):
        names = list(MllamaModel(copy.config).state_dict())
    shard, filled, files = {}, 0, {}

    def flush() -> None:
        nonlocal shard, filled
        if shard:
            file = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, out / file, metadata={"format": "pt"})
            files.update(dict.fromkeys(shard, file))
        shard, filled = {}, 0

    for name, tensor in _copy_tensors(checkpoint, copy, names):
        shard[checkpoint_name(name)] = tensor
        filled += tensor.numel() * tensor.element_size()
        if filled >= 512 << 20:
            flush()
    flush()
    index = {"metadata": {}, "weight_map": dict(sorted(files.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(copy.config.to_hf_dict(), indent=2) + "\n")
    return out


def _copy_tensors(checkpoint, copy: ReducedCopy, names: list[str]) -> Iterator:
    for name in names:
        yield name, copy.tensor(checkpoint, name)


# -- the decision ----------------------------------------------------------------------------


def plan_check(
    options: BuildOptions, config: MllamaConfig, available: int | None = None
) -> CheckPlan:
    """The deepest check that fits in ``available`` bytes (default: what the machine has
    now), as ``options.check_depth`` allows; refused up front when none fits."""
    available = available_memory() if available is None else available
    return shared.plan_check(options, config, available, _sizing())


# -- FP8 calibration ---------------------------------------------------------------------------
#
def calibration_memory(config: MllamaConfig) -> int:
    """Bytes FP8 calibration needs at least: the largest unit it loads, in float32, plus the
    headroom. Independent of depth: it runs one layer at a time."""
    t, v = config.text, config.vision
    embed = t.embedding_rows * t.hidden_size
    lm_head = t.vocab_size * t.hidden_size
    text_layer = (
        3 * t.hidden_size * t.intermediate_size
        + (2 * t.num_heads + 2 * t.num_kv_heads) * t.head_dim * t.hidden_size
    )
    vision_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    return 4 * max(embed, lm_head, text_layer, vision_layer) + CALIBRATION_HEADROOM


def refuse_fp8_calibration(
    options: BuildOptions, config: MllamaConfig, available: int | None = None
) -> None:
    """Refused up front only where even one layer (and the headroom) does not fit in
    ``available`` bytes (default: what the machine has now)."""
    if options.precision == "fp8":
        available = available_memory() if available is None else available
        shared.refuse_calibration(calibration_memory(config), available)
