"""The I/O contract of each exported graph, as plain data: names, dtypes, named dims, meaning."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllama_export.errors import MllamaExportError

from .config import MllamaConfig

# Dims that the runner chooses per call. Everything else is fixed by the model.
DYNAMIC_DIMS = ("batch", "num_images", "image_tokens", "sequence", "num_logits", "past_sequence")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64", "float32" or "model" (the graph's precision)
    dims: tuple[str, ...]
    doc: str

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] for d in self.dims)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if d in DYNAMIC_DIMS}


def static_dims(config: MllamaConfig) -> dict[str, int]:
    v, t = config.vision, config.text
    return {
        "tiles": v.max_num_tiles,
        "channels": v.num_channels,
        "height": v.image_size,
        "width": v.image_size,
        "xattn_layers": len(t.cross_attention_layers),
        "self_layers": len(t.self_attention_layers),
        "kv_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "vocab": t.vocab_size,
        "one": 1,
    }


def logit_positions(length: int, last: int | None = 1) -> np.ndarray:
    """The `logit_positions` input asking for the last `last` of `length` positions (every
    position when `last` is None), in order. Left padding ends every row at length - 1, so
    one vector serves the whole batch: [length - 1] when serving, arange(length) to judge."""
    count = length if last is None else last
    if not 1 <= count <= length:
        raise MllamaExportError(
            f"cannot ask for the logits of the last {count} of {length} positions"
        )
    return np.arange(length - count, length, dtype=np.int64)


def _s(name: str, dtype: str, dims: str, doc: str) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims.split()), doc)


XATTN_KV = "xattn_layers batch kv_heads image_tokens head_dim"
SELF_KV = "self_layers batch kv_heads {} head_dim"

VISION_INPUTS = (
    _s(
        "pixel_values",
        "model",
        "batch num_images tiles channels height width",
        "normalized tiles of each image, padded with zeros to max tiles and max images",
    ),
    _s(
        "aspect_ratio_ids",
        "int64",
        "batch num_images",
        "1-based index of the image's tiling in supported_aspect_ratios; 0 for a padding image",
    ),
    _s("aspect_ratio_mask", "int64", "batch num_images tiles", "1 for a real tile, 0 for padding"),
)
VISION_OUTPUTS = (
    _s(
        "cross_key",
        "model",
        XATTN_KV,
        "keys of every cross-attention layer, projected and k-normed; image_tokens = "
        "num_images x tiles x patches",
    ),
    _s("cross_value", "model", XATTN_KV, "values of every cross-attention layer"),
)
PREFILL_INPUTS = (
    _s("input_ids", "int64", "batch sequence", "prompt tokens, left-padded"),
    _s("position_ids", "int64", "batch sequence", "rope position of each token (pads: any)"),
    _s("attention_mask", "int64", "batch sequence", "1 for a real token, 0 for padding"),
    _s(
        "cross_attention_mask",
        "int64",
        "batch sequence num_images tiles",
        "1 where a text row may see a tile",
    ),
    VISION_OUTPUTS[0],
    VISION_OUTPUTS[1],
    _s(
        "logit_positions",
        "int64",
        "num_logits",
        "0-based positions into sequence whose logits are returned, the same for every row "
        "(left padding puts each row's last token at sequence - 1): [sequence - 1] to serve, "
        "0 .. sequence - 1 to judge every position",
    ),
)
PREFILL_OUTPUTS = (
    _s(
        "logits",
        "float32",
        "batch num_logits vocab",
        "next-token logits at logit_positions; the lm_head runs on those rows only",
    ),
    _s("present_key", "model", SELF_KV.format("sequence"), "self-attention keys of the prompt"),
    _s("present_value", "model", SELF_KV.format("sequence"), "self-attention values of the prompt"),
)
DECODE_INPUTS = (
    _s("input_ids", "int64", "batch one", "the newest token of each sequence"),
    _s("position_ids", "int64", "batch one", "its rope position"),
    _s(
        "attention_mask",
        "int64",
        "batch past_sequence",
        "1 for cache slots holding a real token; 0 for padding and unused slots",
    ),
    _s(
        "past_key",
        "model",
        SELF_KV.format("past_sequence"),
        "self-attention key cache; may be a preallocated buffer longer than what is filled",
    ),
    _s("past_value", "model", SELF_KV.format("past_sequence"), "self-attention value cache"),
    _s(
        "cross_attention_mask",
        "int64",
        "batch one num_images tiles",
        "the tiles the new token may see (the last prompt row repeated)",
    ),
    VISION_OUTPUTS[0],
    VISION_OUTPUTS[1],
)
DECODE_OUTPUTS = (
    _s("logits", "float32", "batch one vocab", "next-token logits"),
    _s("new_key", "model", SELF_KV.format("one"), "the new token's keys, to write into the cache"),
    _s("new_value", "model", SELF_KV.format("one"), "the new token's values"),
)


def contract_markdown() -> str:
    """docs/graphs.md, generated from the data above so that the two cannot drift apart."""
    lines = [
        "# The three graphs and their contract",
        "",
        "Generated from `graphs/contract.py` by `python -m mllama_export.graphs.contract`;",
        "a test fails when this file and the code disagree.",
        "",
        "Named dims: `batch`, `num_images` (images per prompt, padded to the most any prompt",
        "has; text-only batches pass one all-zero slot), `image_tokens` = num_images x tiles x",
        "patches, `sequence` (prompt tokens, left-padded), `num_logits` (positions whose",
        "logits prefill returns: 1 when serving, `sequence` when the gate judges them all),",
        "`past_sequence` (cache slots; may be a preallocated buffer longer than what is",
        "filled). The others are fixed by the model:",
        "`tiles` (max tiles per image), `xattn_layers`, `self_layers`, `kv_heads`, `head_dim`,",
        "`vocab`. dtype `model` is the precision the graphs were built in.",
    ]
    for title, inputs, outputs in (
        ("vision", VISION_INPUTS, VISION_OUTPUTS),
        ("prefill", PREFILL_INPUTS, PREFILL_OUTPUTS),
        ("decode", DECODE_INPUTS, DECODE_OUTPUTS),
    ):
        lines += [
            "",
            f"## {title}",
            "",
            "| | name | dtype | shape | meaning |",
            "|---|---|---|---|---|",
        ]
        for kind, specs in (("in", inputs), ("out", outputs)):
            for s in specs:
                lines.append(
                    f"| {kind} | `{s.name}` | {s.dtype} | [{', '.join(s.dims)}] | {s.doc} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(contract_markdown(), end="")
