"""The I/O contract of each exported graph, as plain data: names, dtypes, named dims, meaning.

The shape comments at the top of each forward (graphs/*.py) abbreviate these dims:

    B     batch                    L_x   xattn_layers            H_kv  kv_heads
    S     sequence                 L_s   self_layers             Dh    head_dim
    I     num_images               V     vocab                   H     query heads (text)
    C, H, W   channels, height, width (pixel_values)
    T     tiles; in the step graph past_sequence (cache slots), with Ti for tiles there
    P     num_logits (logit_positions) in the text graphs; patches per tile in the vision
          graph (P_pad: padded to a multiple of 8), so I*T*P = image_tokens
    N     new_tokens in the step graph; image_tokens in cross-attention K/V (Nx in the step
          graph); B*I, the images flattened, inside the vision encoder
    D     hidden size; L a vision layer's sequence (padded patches of a tile, or T*P_pad);
          neither is an I/O dim
"""

from __future__ import annotations

from mllama_export.errors import MllamaExportError

from .config import MllamaConfig
from .spec import TEXT_DATA_FILE, GraphSpec, TensorSpec

# Dims that the runner chooses per call. Everything else is fixed by the model.
DYNAMIC_DIMS = (
    "batch",
    "num_images",
    "image_tokens",
    "sequence",
    "num_logits",
    "past_sequence",
    "new_tokens",
    "total_sequence",
)


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
        "one": 1,  # the one-token decode graph of artifacts from before the step graph
    }


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
    _s(
        "input_ids",
        "int64",
        "batch new_tokens",
        "the new tokens of each sequence: the newest one when decoding; a chunk of the "
        "left-padded prompt in chunked prefill; the whole prompt in a shared engine's prefill",
    ),
    _s("position_ids", "int64", "batch new_tokens", "their rope positions (pads: any)"),
    _s(
        "attention_mask",
        "int64",
        "batch total_sequence",
        "the past_sequence cache slots (1 holding a real token; 0 for padding and unused "
        "slots), then the new_tokens (1 real, 0 padding): total_sequence = past_sequence + "
        "new_tokens. New tokens see the marked slots and causally each other",
    ),
    _s(
        "past_key",
        "model",
        SELF_KV.format("past_sequence"),
        "self-attention key cache, read in place; may be a preallocated buffer longer than "
        "what is filled (a shared engine's prefill passes one masked slot)",
    ),
    _s("past_value", "model", SELF_KV.format("past_sequence"), "self-attention value cache"),
    _s(
        "cross_attention_mask",
        "int64",
        "batch new_tokens num_images tiles",
        "the tiles each new token may see: the prompt's rows for prompt tokens, the last "
        "prompt row repeated for generated ones",
    ),
    VISION_OUTPUTS[0],
    VISION_OUTPUTS[1],
    _s(
        "logit_positions",
        "int64",
        "num_logits",
        "0-based positions into new_tokens whose logits are returned, the same for every "
        "row: [new_tokens - 1] to decode or serve, 0 .. new_tokens - 1 to judge every one",
    ),
)
DECODE_OUTPUTS = (
    _s(
        "logits",
        "float32",
        "batch num_logits vocab",
        "next-token logits at logit_positions; the lm_head runs on those rows only",
    ),
    _s(
        "new_key",
        "model",
        SELF_KV.format("new_tokens"),
        "the new tokens' keys, to write into the cache after the filled slots",
    ),
    _s("new_value", "model", SELF_KV.format("new_tokens"), "the new tokens' values"),
)


# In the order they run, are exported and listed (manifest, engines, docs/graphs.md).
GRAPHS: dict[str, GraphSpec] = {
    g.name: g
    for g in (
        GraphSpec("vision", VISION_INPUTS, VISION_OUTPUTS, "vision.onnx.data"),
        GraphSpec("prefill", PREFILL_INPUTS, PREFILL_OUTPUTS, TEXT_DATA_FILE, "decode"),
        GraphSpec("decode", DECODE_INPUTS, DECODE_OUTPUTS, TEXT_DATA_FILE),
    )
}
GRAPH_NAMES = tuple(GRAPHS)


def graph_spec(name: str) -> GraphSpec:
    if name not in GRAPHS:
        raise MllamaExportError(f"unknown graph {name!r}; expected one of {list(GRAPHS)}")
    return GRAPHS[name]


def contract_markdown() -> str:
    """Mllama's section of docs/graphs.md (graphs/contracts.py), generated from the data above
    so that the two cannot drift apart."""
    lines = [
        "# Llama 3.2 Vision (mllama): the three graphs and their contract",
        "",
        "Named dims: `batch`, `num_images` (images per prompt, padded to the most any prompt",
        "has; text-only batches pass one all-zero slot), `image_tokens` = num_images x tiles x",
        "patches, `sequence` (prompt tokens, left-padded), `num_logits` (positions whose",
        "logits prefill and decode return: 1 when serving, all when the gate judges them),",
        "`past_sequence` (cache slots; may be a preallocated buffer longer than what is",
        "filled), `new_tokens` (tokens the decode step takes at once: 1 to decode, a chunk",
        "or a whole prompt to prefill), `total_sequence` = past_sequence + new_tokens.",
        "The others are fixed by the model:",
        "`tiles` (max tiles per image), `xattn_layers`, `self_layers`, `kv_heads`, `head_dim`,",
        "`vocab`. dtype `model` is the precision the graphs were built in.",
    ]
    for graph in GRAPHS.values():
        lines += [
            "",
            f"## {graph.name}",
            "",
            "| | name | dtype | shape | meaning |",
            "|---|---|---|---|---|",
        ]
        for kind, specs in (("in", graph.inputs), ("out", graph.outputs)):
            for s in specs:
                lines.append(
                    f"| {kind} | `{s.name}` | {s.dtype} | [{', '.join(s.dims)}] | {s.doc} |"
                )
        lines += NOTES.get(graph.name, [])
    return "\n".join(lines) + "\n"


NOTES = {
    "decode": [
        "",
        "The decode graph is the step graph: `new_tokens` = 1 is a decode step, bit for bit",
        "the one-token decode graph of earlier versions (`tests/test_step_graph.py`); more new",
        "tokens are a chunk of a prompt (`prefill_chunk`, docs/tensorrt.md) or, against one",
        "masked past slot, a whole prompt (the prefill of `build --text-engine shared`). It is",
        "still the manifest's `decode` graph. Artifacts built before it took several tokens",
        "have a decode graph with `input_ids`, `position_ids` [batch, one], `attention_mask`",
        "[batch, past_sequence] (the cache slots only; the new token always saw itself), no",
        "`logit_positions`, and `logits`, `new_key`, `new_value` for one token; the runner",
        "recognizes them by their manifest and still runs them, one token per step.",
    ],
}


if __name__ == "__main__":
    print(contract_markdown(), end="")
