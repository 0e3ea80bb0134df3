"""The I/O contract of LLaVA's three graphs, as plain data (torch-free, like graphs/contract.py)."""

from __future__ import annotations

from .llava_config import LlavaConfig
from .spec import TEXT_DATA_FILE, GraphSpec, TensorSpec

# Dims the runner chooses per call; the others are fixed by the model.
DYNAMIC_DIMS = ("batch", "num_tiles", "sequence", "past_sequence", "num_logits")
LLAVA_DYNAMIC_DIMS = DYNAMIC_DIMS

# image_layout values that are not feature indices
TEXT_TOKEN = -1  # the token's own embedding
NEWLINE_TOKEN = -2  # LLaVA-NeXT's learned image_newline vector, closing a row of tiles' patches


def static_dims(config: LlavaConfig) -> dict[str, int]:
    v, t = config.vision, config.text
    return {
        "channels": v.num_channels,
        "height": v.image_size,
        "width": v.image_size,
        "tile_tokens": config.tile_tokens,
        "text_hidden": t.hidden_size,
        "layers": t.num_layers,
        "kv_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "vocab": t.vocab_size,
        "one": 1,
    }


def dynamic_axes(spec: TensorSpec) -> dict[int, str]:
    """TensorSpec.dynamic_axes for LLaVA's dims (that method knows Mllama's)."""
    return {i: d for i, d in enumerate(spec.dims) if d in LLAVA_DYNAMIC_DIMS}


def _s(name: str, dtype: str, dims: str, doc: str) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims.split()), doc)


KV = "layers batch kv_heads {} head_dim"

VISION_INPUTS = (
    _s(
        "pixel_values",
        "model",
        "num_tiles channels height width",
        "normalized tiles of every image of the batch, in image order; LLaVA-NeXT: each image's "
        "downscaled whole view first, then its grid tiles row by row",
    ),
)
VISION_OUTPUTS = (
    _s(
        "image_features",
        "model",
        "num_tiles tile_tokens text_hidden",
        "projected features of each tile (patches, plus the class token under 'full')",
    ),
)
PREFILL_INPUTS = (
    _s("input_ids", "int64", "batch sequence", "prompt tokens, image tokens expanded, left-padded"),
    _s("position_ids", "int64", "batch sequence", "rope position of each token (pads: any)"),
    _s("attention_mask", "int64", "batch sequence", "1 for a real token, 0 for padding"),
    VISION_OUTPUTS[0],
    _s(
        "image_layout",
        "int64",
        "batch sequence",
        "what each position embeds: an index into image_features flattened to "
        f"[num_tiles x tile_tokens, text_hidden], {TEXT_TOKEN} for the token's own embedding, "
        f"{NEWLINE_TOKEN} for the learned image_newline vector",
    ),
    _s(
        "logit_positions",
        "int64",
        "num_logits",
        "sequence positions whose logits are returned, the same for every row (the last one "
        "for generation: prompts are left-padded)",
    ),
)
PREFILL_OUTPUTS = (
    _s("logits", "float32", "batch num_logits vocab", "next-token logits at logit_positions"),
    _s("present_key", "model", KV.format("sequence"), "keys of the prompt, every layer"),
    _s("present_value", "model", KV.format("sequence"), "values of the prompt, every layer"),
)
DECODE_INPUTS = (
    _s("input_ids", "int64", "batch one", "the newest token of each sequence"),
    _s("position_ids", "int64", "batch one", "its rope position"),
    _s(
        "attention_mask",
        "int64",
        "batch past_sequence",
        "1 for cache slots the new token may see: real tokens, and with a sliding window only "
        "the last window - 1 slots before its own (graphs/llava_layout.py decode_attention_mask)",
    ),
    _s(
        "past_key",
        "model",
        KV.format("past_sequence"),
        "key cache; may be a preallocated buffer longer than what is filled",
    ),
    _s("past_value", "model", KV.format("past_sequence"), "value cache"),
)
DECODE_OUTPUTS = (
    _s("logits", "float32", "batch one vocab", "next-token logits"),
    _s("new_key", "model", KV.format("one"), "the new token's keys, to write into the cache"),
    _s("new_value", "model", KV.format("one"), "the new token's values"),
)

# In the order they run, are exported and listed (manifest, engines, docs/graphs.md).
GRAPHS: dict[str, GraphSpec] = {
    g.name: g
    for g in (
        GraphSpec("vision", VISION_INPUTS, VISION_OUTPUTS, "vision.onnx.data"),
        # no shared text engine: the decode graph takes one token per call, not a chunk
        GraphSpec("prefill", PREFILL_INPUTS, PREFILL_OUTPUTS, TEXT_DATA_FILE),
        GraphSpec("decode", DECODE_INPUTS, DECODE_OUTPUTS, TEXT_DATA_FILE),
    )
}
llava_static_dims = static_dims


def contract_markdown() -> str:
    """LLaVA's section of docs/graphs.md (graphs/contracts.py), generated from the data above."""
    lines = [
        "# LLaVA 1.5 and LLaVA-NeXT (llava, llava_next): the three graphs and their contract",
        "",
        "Named dims: `batch`, `num_tiles` (every tile of every image in the batch: one per",
        "LLaVA 1.5 image, 1 + grid tiles per LLaVA-NeXT image), `sequence` (prompt tokens with",
        "image tokens expanded, left-padded), `past_sequence` (cache slots), `num_logits`.",
        "Fixed by the model: `tile_tokens`, `text_hidden`, `layers`, `kv_heads`, `head_dim`,",
        "`vocab`. dtype `model` is the precision the graphs were built in.",
    ]
    for title, g in GRAPHS.items():
        inputs, outputs = g.inputs, g.outputs
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
