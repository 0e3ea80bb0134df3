"""LLaVA's memory and speed plan, from the config alone: parameters, weight bytes per precision,
the KV cache per token, image tokens, and each engine's memory and roofline lower bound.

The definitions follow Mllama's planner (exporter/plan.py) with LLaVA's engines:

* vision holds the CLIP tower up to its deepest feature layer (layers past it are in the
  checkpoint and never run) and the projector; prefill and decode each hold the text decoder
  (embedding, the newline vector of LLaVA-NeXT, every layer, final norm, lm_head), twice in all:
  LLaVA has no shared text engine (its decode graph takes one token a call).
* Precision: fp32 4 bytes a value, fp16/bf16 2; fp8 stores the decoder's linear layers in 1
  byte and everything else (tower, projector, embedding, lm_head, norms) in 2. Activations and
  caches are 2 bytes (fp32: 4).
* Caches at the profile maxima: L x 2 x B x H_kv x max_seq_len x Dh; no cross-attention cache.
  The image features pass from vision to prefill: B x max_images x the largest image's tiles x
  tile_tokens x D.
* Scratch, one buffer the contexts share (the largest engine's): one layer's live set, plus the
  tensors engines/llava_profiles.py counts as materialized (the prefill's repeated attention
  mask, 1 byte a slot, and the decode step's float32 scores); fused attention's scores are not
  held (`unfused` says what they would add).
* Roofline: max(FLOPs / peak, bytes / bandwidth); decode per step reads every text weight but
  the embedding table, and the cache over the context.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllama_export.engines.llava_profiles import max_image_tiles, max_image_tokens
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.choices import PRECISIONS
from mllama_export.graphs.llava_config import LlavaConfig

from .planning import GPUS, Gpu, duration, positive

LOGIT_BYTES = 4


@dataclass(frozen=True)
class LlavaParams:
    """Parameter counts by owner; `checkpoint` adds what the files hold and no graph reads."""

    tower: int  # CLIP up to the deepest feature layer
    tower_matmul: int  # its layers' matmul weights, for FLOPs
    projector: int
    newline: int  # LLaVA-NeXT's image_newline
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    decoder_linear: int  # q/k/v/o and gate/up/down of every layer: fp8-able
    decoder_other: int  # RMSNorms
    unused: int  # CLIP layers past the feature layer, its post-layernorm

    @property
    def vision_engine(self) -> int:
        return self.tower + self.projector

    @property
    def text_engine(self) -> int:
        return (
            self.newline + self.embedding + self.lm_head + self.decoder_linear + self.decoder_other
        )

    @property
    def graphs(self) -> int:
        return self.vision_engine + self.text_engine

    @property
    def checkpoint(self) -> int:
        return self.graphs + self.unused


def count_params(config: LlavaConfig) -> LlavaParams:
    """Every parameter of the LLaVA model of `config`, by formula."""
    v, t = config.vision, config.text
    dv, d = v.hidden_size, t.hidden_size
    layer_matmul = 4 * dv * dv + 2 * dv * v.intermediate_size
    layer = layer_matmul + 4 * dv + v.intermediate_size + dv + 4 * dv  # biases, 2 LayerNorms
    embeddings = v.num_channels * v.patch_size**2 * dv + dv + (v.grid**2 + 1) * dv
    depth = config.vision_depth
    bias = 2 * d if config.multimodal_projector_bias else 0
    attention = 2 * d * t.num_heads * t.head_dim + 2 * d * t.num_kv_heads * t.head_dim
    return LlavaParams(
        tower=embeddings + 2 * dv + depth * layer,  # + pre-layernorm
        tower_matmul=depth * layer_matmul,
        projector=config.feature_dim * d + d * d + bias,
        newline=d if config.is_next else 0,
        embedding=t.vocab_size * d,
        lm_head=0 if config.tied_lm_head else t.vocab_size * d,
        decoder_linear=t.num_layers * (attention + 3 * d * t.intermediate_size),
        decoder_other=t.num_layers * 2 * d + d,
        unused=(v.num_layers - depth) * layer + 2 * dv,
    )


def weight_bytes(p: LlavaParams, precision: str) -> tuple[int, int]:
    """(vision engine, one text engine) weight bytes at `precision`."""
    unit = 4 if precision == "fp32" else 2
    linear = 1 if precision == "fp8" else unit
    return unit * p.vision_engine, unit * (p.text_engine - p.decoder_linear) + linear * (
        p.decoder_linear
    )


@dataclass(frozen=True)
class LlavaPlan:
    label: str
    config: LlavaConfig
    precision: str
    gpu: Gpu
    max_batch: int
    max_seq_len: int
    max_images: int
    prompt_len: int
    tiles: int  # per image, for the vision roofline
    params: LlavaParams
    weights: dict[str, int]  # engine -> its own copy
    kv_cache: int
    kv_per_token: int  # all layers, one sequence
    features: int  # vision's output held for prefill
    scratch: dict[str, int]  # engine -> live set and materialized tensors
    unfused: dict[str, int]  # engine -> what unfused attention scores would add
    outputs: int
    seconds: dict[str, float]  # engine -> roofline lower bound
    decode_floor_bytes: int  # one step at an empty context
    decode_ceiling_bytes: int  # one step with max_seq_len cached

    @property
    def total(self) -> int:
        return (
            sum(self.weights.values())
            + self.kv_cache
            + self.features
            + self.outputs
            + max(self.scratch.values())
        )

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu.memory_bytes


def check_limits(config: LlavaConfig, precision, batch, seq, images, gpu, prompt, tiles, label):
    """One-line refusals of a plan `build` would refuse or the model cannot run."""
    if precision not in PRECISIONS:
        raise MllamaExportError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if gpu not in GPUS:
        raise MllamaExportError(f"unknown gpu {gpu!r}; expected one of {', '.join(GPUS)}")
    for name, value in (("max_batch", batch), ("max_seq_len", seq), ("max_images", images)):
        positive(name, value)
    context = config.text.max_position_embeddings
    if seq > context:
        raise MllamaExportError(
            f"max_seq_len {seq} exceeds {label}'s max_position_embeddings {context}; "
            f"expected 1..{context}"
        )
    per_image = max_image_tokens(config)
    need = images * per_image + 1
    if seq < need:
        fit = (context - 1) // per_image  # images the model's positions hold at all
        if need <= context:
            way = f"--max-seq-len at least {need}, or fewer --max-images"
        elif fit:
            way = f"--max-images {fit} at most (its {context} positions hold no more)"
        else:
            way = f"another checkpoint: its {context} positions cannot hold one image"
        raise MllamaExportError(
            f"max_seq_len {seq} cannot hold {images} image(s) of {label} ({per_image} "
            f"tokens each at most) and a token of text; expected {way}"
        )
    if prompt is not None and not 1 <= positive("prompt_len", prompt) <= seq:
        raise MllamaExportError(f"prompt_len {prompt} exceeds max_seq_len {seq}; expected 1..{seq}")
    most = max_image_tiles(config)
    if tiles is not None and not 1 <= positive("tiles", tiles) <= most:
        raise MllamaExportError(
            f"tiles {tiles}: a {label} image takes at most {most} tile(s); expected 1..{most}"
        )


def plan(
    config: LlavaConfig,
    precision: str,
    max_batch: int,
    max_seq_len: int,
    max_images: int,
    gpu: str = "h100",
    prompt_len: int | None = None,
    tiles: int | None = None,
    label: str = "the model",
) -> LlavaPlan:
    """Memory at the profile maxima and roofline times (prompt_len: default max_seq_len;
    tiles per image: default the largest image's)."""
    check_limits(
        config, precision, max_batch, max_seq_len, max_images, gpu, prompt_len, tiles, label
    )
    v, t = config.vision, config.text
    b, s_max, g = max_batch, max_seq_len, GPUS[gpu]
    s = prompt_len or s_max
    n_tiles = tiles or max_image_tiles(config)
    p = count_params(config)
    unit = 4 if precision == "fp32" else 2
    vision_w, text_w = weight_bytes(p, precision)
    kv_per_token = t.num_layers * 2 * t.num_kv_heads * t.head_dim * unit
    kv = b * s_max * kv_per_token
    most_tiles = b * max_images * max_image_tiles(config)
    features = most_tiles * config.tile_tokens * t.hidden_size * unit
    group = t.num_heads // t.num_kv_heads
    per_token = 2 * t.hidden_size + (2 * t.num_heads + 2 * t.num_kv_heads) * t.head_dim
    per_token = (per_token + 2 * t.intermediate_size) * unit
    tokens_v = v.grid**2 + 1
    per_vision = 6 * v.hidden_size + v.intermediate_size + config.feature_dim + t.hidden_size
    scratch = {
        "vision": most_tiles * tokens_v * per_vision * unit,
        "prefill": b * s_max * per_token + b * group * s_max * s_max,  # + the repeated mask
        "decode": b * per_token + b * t.num_heads * (s_max + 1) * 4,
    }
    unfused = {
        "vision": most_tiles * v.num_heads * tokens_v**2 * 4,
        "prefill": b * t.num_heads * s_max * s_max * 4,
        "decode": 0,
    }
    logits = b * t.vocab_size * LOGIT_BYTES
    outputs = max(logits + kv, logits + b * kv_per_token)  # prefill's present K/V, decode's new
    read = text_w - (4 if precision == "fp32" else 2) * p.embedding
    rate = g.bf16_flops / (2 if precision == "fp32" else 1)  # fp32 runs at the TF32 rate
    linear_rate = g.fp8_flops if precision == "fp8" else rate
    tiles_run = b * max_images * n_tiles
    vision_flops = 2 * p.tower_matmul * tiles_run * tokens_v + 2 * p.projector * tiles_run * (
        config.tile_tokens
    )
    vision_flops += 4 * v.hidden_size * tokens_v**2 * config.vision_depth * tiles_run
    attention = 4 * t.head_dim * t.num_heads * t.num_layers * b
    prefill_flops = attention * s * (s + 1) // 2 + 2 * p.lm_head * b
    prefill_s = max(
        2 * p.decoder_linear * b * s / linear_rate + prefill_flops / rate,
        (read + b * s * kv_per_token) / g.bandwidth,
    )
    floor = read + b * kv_per_token
    ceiling = read + b * (s_max + 1) * kv_per_token
    return LlavaPlan(
        label, config, precision, g, b, s_max, max_images, s, n_tiles, p,
        {"vision": vision_w, "prefill": text_w, "decode": text_w}, kv, kv_per_token, features,
        scratch, unfused, outputs,
        {"vision": max(vision_flops / rate, vision_w / g.bandwidth), "prefill": prefill_s,
         "decode": ceiling / g.bandwidth},
        floor, ceiling,
    )  # fmt: skip


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def format_plan(r: LlavaPlan) -> str:
    """The terminal table: what the model is, then each engine's memory and time."""
    p, c, g = r.params, r.config, r.gpu
    per_precision = ", ".join(
        f"{q} {_gb(sum(weight_bytes(p, q)) + weight_bytes(p, q)[1])} GB" for q in PRECISIONS
    )
    lines = [
        f"model {r.label}: {c.model_type}, {p.checkpoint / 1e9:.2f}B parameters in the "
        f"checkpoint ({p.graphs / 1e9:.2f}B run: vision {p.vision_engine / 1e6:.0f}M, text "
        f"{p.text_engine / 1e6:.0f}M)",
        f"image tokens: at most {max_image_tokens(c)} per image in {max_image_tiles(c)} tile(s) "
        f"of {c.tile_tokens} features; KV cache {r.kv_per_token / 1e6:.3f} MB per token",
        f"weights of the three engines by precision: {per_precision}",
        f"precision {r.precision} on {g.name}: {g.memory_bytes / 1e9:.0f} GB, "
        f"{g.bandwidth / 1e12:.2f} TB/s; profile maxima: batch {r.max_batch}, seq "
        f"{r.max_seq_len}, images {r.max_images}; roofline at prompt {r.prompt_len}, "
        f"{r.tiles} tile(s) per image",
        "",
        f"{'engine':<10}{'weights':>10}{'scratch':>10}{'unfused':>10}{'roofline':>12}",
    ]
    for name in ("vision", "prefill", "decode"):
        lines.append(
            f"{name:<10}{_gb(r.weights[name]):>10}{_gb(r.scratch[name]):>10}"
            f"{_gb(r.unfused[name]):>10}{duration(r.seconds[name]):>12}"
        )
    lines += [
        "-" * 52,
        f"weights {_gb(sum(r.weights.values()))} GB (prefill and decode hold the text weights "
        f"each) + KV cache {_gb(r.kv_cache)} GB + image features {_gb(r.features)} GB + "
        f"scratch {_gb(max(r.scratch.values()))} GB (shared) + outputs {_gb(r.outputs)} GB",
        f"memory: {_gb(r.total)} GB of {g.memory_bytes / 1e9:.0f} GB -> "
        + (
            f"fits, {_gb(g.memory_bytes - r.total)} GB free"
            if r.fits
            else f"does NOT fit, {_gb(r.total - g.memory_bytes)} GB over"
        ),
        f"decode per step: {_gb(r.decode_floor_bytes)} GB read -> "
        f"{duration(r.decode_floor_bytes / g.bandwidth)} at an empty context, "
        f"{_gb(r.decode_ceiling_bytes)} GB -> {duration(r.decode_ceiling_bytes / g.bandwidth)} "
        f"with {r.max_seq_len} cached",
    ]
    return "\n".join(lines)
