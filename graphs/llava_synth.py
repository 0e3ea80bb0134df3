"""LLaVA's synthetic checkpoints: what graphs/synthetic.py writes beside the weights (the
generation config, the processor files, the tokenizer of a tiny vocabulary), the geometry in
words, and the shallower configs of `synth --text-layers ...` (LLaVA's "truncated" part).

The weights themselves are every family's writer's (graphs/synthetic.py), under the published
llava-hf names, the tensors a real checkpoint carries unused included (graphs/llava_weights.py).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from mllama_export.errors import MllamaExportError

from .llava_config import LlavaConfig, validate_llava_config
from .llava_synth_files import write_llava_processor, write_llava_tokenizer

# the largest vocabulary the built-in corpus trains a tokenizer for (graphs/synth_files.py)
TOKENIZER_VOCAB = 666


def describe(config: LlavaConfig) -> str:
    t, v = config.text, config.vision
    kind = "LLaVA-NeXT (anyres)" if config.is_next else "LLaVA 1.5"
    return (
        f"{kind}, {t.num_layers} {t.model_type} text layers, {v.num_layers} CLIP vision layers "
        f"({config.vision_depth} run), {config.tile_tokens} features per tile"
    )


def write_side_files(config: LlavaConfig, out: Path) -> None:
    """generation_config.json and the processor files; the tokenizer too where the vocabulary
    is a tiny one's (a trained BPE vocabulary needs real text per token)."""
    t = config.text
    generation = {
        "bos_token_id": t.bos_token_id,
        "eos_token_id": list(t.eos_token_ids),
        "pad_token_id": config.pad_token_id if config.pad_token_id is not None else t.pad_token_id,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_llava_processor(config, out)
    if t.vocab_size <= TOKENIZER_VOCAB:
        write_llava_tokenizer(config, out)


def truncated(
    config: LlavaConfig,
    text_layers: int | None = None,
    vision_layers: int | None = None,
    global_layers: int | None = None,
    cross_layers: tuple[int, ...] | None = None,
) -> LlavaConfig:
    """The same widths with only the first layers of the text model and the vision tower.

    A depth not given keeps the preset's; with fewer text layers, the tower's depth scales
    alike (so that timings stay representative). Layer i of the result is layer i of
    ``config``: negative feature layers keep counting from the new top (-2: the penultimate),
    positive ones past it read the top instead.
    """
    if global_layers is not None or cross_layers is not None:
        given = "--global-layers" if global_layers is not None else "--cross-layers"
        raise MllamaExportError(
            f"{given}: LLaVA has no global vision layers or cross-attention layers; "
            "use --text-layers and --vision-layers"
        )
    t, v = config.text, config.vision
    text = t.num_layers if text_layers is None else text_layers
    _check_depth("text-layers", text, t.num_layers)
    vision = max(1, round(v.num_layers * text / t.num_layers))
    vision = vision if vision_layers is None else vision_layers
    _check_depth("vision-layers", vision, v.num_layers)
    layer = config.vision_feature_layer
    layers = (layer,) if isinstance(layer, int) else layer
    kept = tuple(i if i < 0 else min(i, vision) for i in layers)
    result = replace(
        config,
        text=replace(t, num_layers=text),
        vision=replace(v, num_layers=vision),
        vision_feature_layer=kept[0] if isinstance(layer, int) else kept,
    )
    validate_llava_config(result)
    return result


def _check_depth(name: str, layers: int, original: int) -> None:
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= original:
        raise MllamaExportError(
            f"--{name} {layers!r}: a truncated model keeps between 1 and the original "
            f"{original} layers"
        )
