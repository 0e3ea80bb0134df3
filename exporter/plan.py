"""Memory and speed planner: how much GPU memory each engine needs and a roofline lower bound on
its time, from the config alone. Pure arithmetic; nothing here imports torch.

Units: bytes, FLOPs and seconds; GB and TB/s are decimal (1e9, 1e12), as the datasheets quote them.

Definitions (the tests pin them to hand calculations):

* Engine ownership of weights. The vision engine holds the vision tower, the projector and every
  cross-attention layer's k_proj, v_proj and k_norm (it computes the cross K/V). Prefill and decode
  hold the rest of the text decoder: embedding (vocab + 8 rows), self layers, cross layers without
  k/v/k_norm, final norm and lm_head. With `text_engine` "split" they are two TensorRT engines,
  and each holds its own copy of these weights (an engine owns its weights; the project uses no
  weight streaming, stripped plans or refit), so the totals count them twice. With "shared" one
  engine of the decode (step) graph serves both phases and holds them once; its prefill is a
  phase of that engine (the prefill row's weights read "(decode)").
* Precision. fp32 stores every parameter, cache and activation in 4 bytes and runs its GEMMs
  at the TF32 tensor-core rate (half the bf16 one). bf16 and fp16 store every parameter in 2 bytes. fp8 stores the text decoder's linear
  layers (q/k/v/o of self and cross attention, including the cross k/v projections that run in the
  vision engine, and gate/up/down of the MLPs) in 1 byte; embedding, lm_head, norms, gates, the
  vision tower and the projector stay 2 bytes. Activations and KV caches stay 16-bit (2 bytes);
  per-tensor FP8 scales are a few bytes per layer and are ignored.
* Caches at the profile maxima. Self: L_self x 2 x B x H_kv x max_seq_len x Dh x 2 bytes.
  Cross: L_x x 2 x B x H_kv x (max_images x max_num_tiles x num_patches) x Dh x 2 bytes.
* Scratch (execution-context activations): one layer's live set per engine, plus the attention
  score tensors where attention is not fused: the decode step's self-attention scores
  (B x H x (max_seq_len + 1) float32, engines/profiles.py materialized_scores); the vision,
  prefill and cross-attention graphs are written in TensorRT's fusable attention form, whose
  S x S scores are not materialized (`attention_scores_bytes` says what they would add if not).
  The three contexts share one user-managed scratch buffer (engines/tensorrt.py DeviceScratch;
  they run one after another), so the total counts the largest engine's, not their sum:
    text, per token: 2*D + (H + 2*H_kv)*Dh + H*Dh + 2*I  values (residual, normed input, q/k/v,
      attention output, MLP gate and up), x 2 bytes, over B*max_seq_len tokens (prefill) or B
      (decode). A shared engine's prefill takes at most N = step_tokens new tokens per call
      (engines/profiles.py; longer prompts in chunks against the cache), so its live set is over
      B*N tokens, plus its materialized self-attention scores B x H x N x (max_seq_len + N)
      float32 (a chunk against a full cache buffer: the largest call).
    vision, per token: 6*Dv + Iv + taps*Dv + output_dim + D values (residual, normed, q/k/v/o, MLP
      hidden, the tapped states kept to the end, the features and their projection) x 2 bytes, over
      B*max_images*max_num_tiles*padded_patches tokens.
* Outputs that are not caches: the float32 logits, B x V x 4 for prefill (serving asks for the
  last position only) and for decode, and prefill's present K/V (the self cache at max_seq_len;
  shared: one call's new K/V, N tokens), which the runner copies into its cache buffers while
  both exist.
* Roofline, a lower bound: time = max(FLOPs / peak, bytes / bandwidth), FLOPs = 2 x matmul params
  x tokens + attention (4 x Dh per query-key pair and head; causal prefill counts S(S+1)/2 pairs);
  prefill's lm_head runs on the last position of each sequence only (serving's logit_positions).
  A shared engine's prefill scores every key it is given: S(S+1) pairs against one masked slot,
  or N x (max_seq_len + N) per chunk, and reads the weights (and the cache buffer) once a call.
  With fp8 the text decoder's linear FLOPs run at the FP8 peak, everything else at the bf16 peak.
* Bytes read per decode step: every weight the decoder reads (all of prefill/decode's weights
  except the embedding table, of which a step reads one row; lm_head included) + the cross K/V
  cache + the self cache over the context (+ the new token's K/V). The "floor" is at an empty
  context, the "ceiling" with max_seq_len cached tokens. For 11B at batch 1 with one 4-tile image
  the floor is 18.6 GB in bf16 (5.5 ms at 3.35 TB/s) and 9.9 GB with FP8 linears (3.0 ms).
"""

from __future__ import annotations

from dataclasses import dataclass

from mllama_export.engines.profiles import check_text_engine, step_tokens
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.choices import DEFAULT_TEXT_ENGINE, PRECISIONS
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.limits import Limits

from .planning import GB, GPUS, Gpu, duration, positive

ACT_BYTES = 2  # activations and caches are 16-bit whatever the weight precision (fp32: 4)
LOGIT_BYTES = 4  # the graphs return float32 logits


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts, grouped by owner and by whether fp8 would store them in 1 byte."""

    vision_tower: int
    vision_tower_matmul: int  # the transformer layers' matmul weights, for FLOPs
    patch_embedding: int
    projector: int
    cross_kv: int  # k_proj + v_proj of every cross layer (linear: fp8-able)
    cross_k_norm: int
    embedding: int  # (vocab + 8) x hidden
    lm_head: int
    decoder_linear: int  # self q/k/v/o + cross q/o + every MLP (fp8-able)
    decoder_other: int  # layer norms, q_norm, gates, final norm

    @property
    def vision_engine(self) -> int:
        return self.vision_tower + self.projector + self.cross_kv + self.cross_k_norm

    @property
    def text_engine(self) -> int:
        """Prefill's (and decode's, shared) weights."""
        return self.embedding + self.lm_head + self.decoder_linear + self.decoder_other

    @property
    def total(self) -> int:
        return self.vision_engine + self.text_engine


def count_params(config: MllamaConfig) -> ParamCounts:
    """Counts every parameter of `MllamaModel(config)` by formula."""
    v, t = config.vision, config.text
    d, dv, dh = t.hidden_size, v.hidden_size, t.head_dim
    ratios = v.max_aspect_ratio_id + 1  # the embeddings keep a row for id 0 (padding image)
    vision_layer_matmul = 4 * dv * dv + 2 * dv * v.intermediate_size
    vision_layer = vision_layer_matmul + v.intermediate_size + dv + 4 * dv  # fc biases, 2 norms
    patch = v.num_channels * v.patch_size**2 * dv
    layers = v.num_layers + v.num_global_layers
    vision_tower = (
        patch
        + dv  # class embedding
        + 1
        + v.num_patches * dv
        + ratios * v.max_num_tiles * v.num_patches * dv  # gated pos.
        + 2 * (ratios * v.max_num_tiles * dv + 1)  # pre/post tile embeddings with their gates
        + 2 * 2 * dv  # layernorm_pre, layernorm_post
        + layers * vision_layer
        + 2 * v.num_global_layers  # gate_attn, gate_ffn
    )
    n_cross = len(t.cross_attention_layers)
    n_self = t.num_layers - n_cross
    q_o = 2 * d * t.num_heads * dh
    k_v = 2 * d * t.num_kv_heads * dh
    mlp = 3 * d * t.intermediate_size
    return ParamCounts(
        vision_tower=vision_tower,
        vision_tower_matmul=layers * vision_layer_matmul,
        patch_embedding=patch,
        projector=v.output_dim * d + d,
        cross_kv=n_cross * k_v,
        cross_k_norm=n_cross * dh,
        embedding=t.embedding_rows * d,
        lm_head=t.vocab_size * d,
        decoder_linear=n_self * (q_o + k_v + mlp) + n_cross * (q_o + mlp),
        decoder_other=n_self * 2 * d + n_cross * (2 * d + dh + 2) + d,
    )


@dataclass(frozen=True)
class EngineMemory:
    """One engine's memory and roofline time at the profile maxima."""

    name: str
    params: int
    weight_bytes: int  # the engine's own copy
    cache_bytes: int  # the caches it reads or writes at the profile maxima (shared, not owned)
    activation_bytes: int  # its scratch: live set, unfused attention scores included
    output_bytes: int  # its outputs other than the caches (logits, present or new K/V)
    attention_scores_bytes: int  # what its fused attention's scores would add if unfused
    flops: float  # at the roofline point
    bytes_moved: float
    seconds: float  # roofline lower bound
    bound: str  # "compute" or "memory"
    roofline_at: str  # the workload the roofline is computed for


@dataclass(frozen=True)
class DecodeRoofline:
    """Bytes one decode step reads: weights + cross cache + self cache per cached token."""

    weight_bytes: int  # decoder weights without the embedding table, lm_head included
    cross_cache_bytes: int  # at max_images and `tiles`
    self_cache_bytes_per_token: int  # per cached position, all self layers, whole batch
    batch: int
    bandwidth: float

    def bytes_per_step(self, context: int) -> int:
        """Reads `context` cached positions and writes the new one."""
        return (
            self.weight_bytes
            + self.cross_cache_bytes
            + self.self_cache_bytes_per_token * (context + 1)
        )

    def seconds_per_step(self, context: int) -> float:
        return self.bytes_per_step(context) / self.bandwidth


@dataclass(frozen=True)
class Plan:
    precision: str
    gpu: Gpu
    max_batch: int
    max_seq_len: int
    max_images: int
    prompt_len: int
    tiles: int
    max_tiles: int
    params: ParamCounts
    vision: EngineMemory
    prefill: EngineMemory
    decode: EngineMemory
    self_cache_bytes: int
    cross_cache_bytes: int
    weight_bytes: int  # every engine's, prefill's and decode's text weights each
    scratch_bytes: int  # the shared execution-context scratch: the largest engine's
    output_bytes: int  # non-cache outputs alive at once: prefill's logits and present K/V
    total_bytes: int
    fits: bool
    decode_roofline: DecodeRoofline
    decode_floor_bytes: int  # per step, empty context
    decode_floor_seconds: float
    decode_ceiling_bytes: int  # per step, max_seq_len cached
    decode_ceiling_seconds: float
    text_engine: str = "split"
    step_tokens: int | None = None  # shared: the most new tokens one call of its engine takes

    @property
    def engines(self) -> tuple[EngineMemory, EngineMemory, EngineMemory]:
        return (self.vision, self.prefill, self.decode)

    @property
    def free_bytes(self) -> int:
        return self.gpu.memory_bytes - self.total_bytes


@dataclass(frozen=True)
class _Prefill:
    act: int  # scratch at the profile maxima: one layer's live set (+ materialized scores)
    out: int  # last-position logits and the new K/V the runner copies into its cache
    scores: int  # what fused attention's scores would add if the builder did not fuse them
    self_pairs: int  # query-key pairs per head and layer the self-attention computes
    calls: int  # calls of the engine one prompt takes
    past_read: int  # cache slots each call reads (0: no cache buffer)
    step_tokens: int | None


def _prefill_work(config, text_engine, b, s, s_max, images, token_bytes, kv_row) -> _Prefill:
    """split: the prefill engine takes the whole prompt, its attention fused (causal:
    s(s+1)/2 pairs). shared: the decode (step) graph takes at most `top` new tokens per call
    (engines/profiles.py step_tokens): the whole prompt against one masked slot, or chunks of
    `top` against the cache buffer, whose every slot is scored; its scores are materialized
    ([B, H, N, past + N] float32), the largest at a chunk against a full cache."""
    t, v = config.text, config.vision
    n_self = len(t.self_attention_layers)
    logits = b * t.vocab_size * LOGIT_BYTES
    image_tokens_max = images * v.max_num_tiles * v.num_patches
    if text_engine == "split":
        return _Prefill(
            act=b * s_max * token_bytes,
            out=logits + n_self * b * s_max * kv_row,
            scores=b * t.num_heads * s_max * s_max * 4,
            self_pairs=s * (s + 1) // 2,
            calls=1, past_read=0, step_tokens=None,
        )  # fmt: skip
    top = step_tokens(config, Limits(b, s_max, images))
    chunks = [s] if s <= top else [min(top, s - a) for a in range(0, s, top)]
    past = 1 if len(chunks) == 1 else s_max
    return _Prefill(
        act=b * top * token_bytes + b * t.num_heads * top * (s_max + top) * 4,
        out=logits + n_self * b * top * kv_row,
        scores=b * t.num_heads * top * image_tokens_max * 4,  # the cross-attention's, fused
        self_pairs=sum(n * (past + n) for n in chunks),
        calls=len(chunks), past_read=0 if past == 1 else s_max, step_tokens=top,
    )  # fmt: skip


def _roofline(flops16: float, flops8: float, moved: float, gpu: Gpu) -> tuple[float, str]:
    compute = flops16 / gpu.bf16_flops + flops8 / gpu.fp8_flops
    memory = moved / gpu.bandwidth
    return (compute, "compute") if compute >= memory else (memory, "memory")


def plan(
    config: MllamaConfig,
    precision: str,
    max_batch: int,
    max_seq_len: int,
    max_images: int,
    gpu: str = "h100",
    prompt_len: int | None = None,
    tiles: int | None = None,
    text_engine: str = DEFAULT_TEXT_ENGINE,
) -> Plan:
    """Memory at the profile maxima and roofline times; `prompt_len` (default max_seq_len) sets
    the prefill workload, `tiles` per image (default max_num_tiles, what the graphs compute since
    they pad every image to max tiles) the vision and cross-attention workload; `text_engine`
    split (prefill and decode engines, the text weights twice) or shared (one engine, once)."""
    check_text_engine(text_engine)
    if precision not in PRECISIONS:
        raise MllamaExportError(
            f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}"
        )
    if gpu not in GPUS:
        raise MllamaExportError(f"unknown gpu {gpu!r}; expected one of {', '.join(GPUS)}")
    b = positive("max_batch", max_batch)
    s_max = positive("max_seq_len", max_seq_len)
    images = positive("max_images", max_images)
    v, t = config.vision, config.text
    if s_max > t.max_position_embeddings:
        raise MllamaExportError(
            f"max_seq_len {s_max} exceeds the model's max_position_embeddings "
            f"{t.max_position_embeddings}; expected 1..{t.max_position_embeddings}"
        )
    s = s_max if prompt_len is None else positive("prompt_len", prompt_len)
    if s > s_max:
        raise MllamaExportError(f"prompt_len {s} exceeds max_seq_len {s_max}; expected 1..{s_max}")
    n_tiles = v.max_num_tiles if tiles is None else positive("tiles", tiles)
    if n_tiles > v.max_num_tiles:
        raise MllamaExportError(
            f"tiles {n_tiles} exceeds the model's max_num_tiles; expected 1..{v.max_num_tiles}"
        )
    g = GPUS[gpu]
    p = count_params(config)
    # bytes of every weight, cache and activation value (fp32 graphs: all float32), and of a
    # text-decoder linear parameter (fp8: 1); fp32 runs on TF32 tensor cores, at half the bf16 rate
    unit = 4 if precision == "fp32" else ACT_BYTES
    lin = 1 if precision == "fp8" else unit
    tf32 = 2 if precision == "fp32" else 1

    d, dh, h, h_kv = t.hidden_size, t.head_dim, t.num_heads, t.num_kv_heads
    n_cross = len(t.cross_attention_layers)
    n_self = t.num_layers - n_cross
    kv_row = 2 * h_kv * dh * unit  # K and V of one position in one layer

    # Caches at the profile maxima, and the cross cache at the roofline's tile count.
    image_tokens_max = images * v.max_num_tiles * v.num_patches
    image_tokens = images * n_tiles * v.num_patches
    self_cache = n_self * b * s_max * kv_row
    cross_cache = n_cross * b * image_tokens_max * kv_row
    cross_cache_used = n_cross * b * image_tokens * kv_row

    # Weights.
    vision_w = unit * (p.vision_tower + p.projector + p.cross_k_norm) + lin * p.cross_kv
    text_w = unit * (p.embedding + p.lm_head + p.decoder_other) + lin * p.decoder_linear
    read_w = text_w - unit * p.embedding  # a step reads one embedding row per token, not the table

    # Vision: B x images, each padded to max tiles in memory; roofline at `tiles` per image.
    n_img = b * images
    seq_max = v.max_num_tiles * v.padded_patches
    seq = n_tiles * v.padded_patches
    vision_tokens = n_img * seq
    taps = len(v.intermediate_layers)
    per_token = 6 * v.hidden_size + v.intermediate_size + taps * v.hidden_size + v.output_dim + d
    vision_act = n_img * seq_max * per_token * unit
    vision_scores = n_img * v.num_heads * seq_max * seq_max * 4  # fused: not held
    layers = v.num_layers + v.num_global_layers
    vision_flops16 = (
        2 * p.vision_tower_matmul * vision_tokens
        + 2 * p.patch_embedding * n_img * n_tiles * (v.num_patches - 1)
        + layers * 4 * v.hidden_size * seq * seq * n_img
        + 2 * (v.output_dim * d) * n_img * n_tiles * v.num_patches
    )
    vision_flops8 = 2 * p.cross_kv * n_img * n_tiles * v.num_patches
    if precision != "fp8":
        vision_flops16, vision_flops8 = vision_flops16 + vision_flops8, 0
    vision_moved = vision_w + cross_cache_used
    vision_s, vision_bound = _roofline(vision_flops16 * tf32, vision_flops8, vision_moved, g)

    # Prefill at `prompt_len`; its memory at the profile maxima (the prompt at max_seq_len, or
    # a shared engine's largest call).
    text_per_token = 2 * d + (h + 2 * h_kv) * dh + h * dh + 2 * t.intermediate_size
    pre = _prefill_work(config, text_engine, b, s, s_max, images, text_per_token * unit, kv_row)
    prefill_act, prefill_out, prefill_scores = pre.act, pre.out, pre.scores
    attn_prefill = b * h * dh * (n_self * 4 * pre.self_pairs + n_cross * 4 * s * image_tokens)
    prefill_flops8 = 2 * p.decoder_linear * b * s
    prefill_flops16 = 2 * p.lm_head * b + attn_prefill  # the lm_head on the last position only
    if precision != "fp8":
        prefill_flops16, prefill_flops8 = prefill_flops16 + prefill_flops8, 0
    # weights once per call; a chunk reads the whole cache buffer, the prompt's K/V written once
    prefill_moved = (
        pre.calls * (read_w + pre.past_read * n_self * b * kv_row)
        + b * s * d * 2
        + cross_cache_used
        + n_self * b * s * kv_row
    )
    prefill_s, prefill_bound = _roofline(prefill_flops16 * tf32, prefill_flops8, prefill_moved, g)

    # Decode: memory at max_seq_len; roofline at the full context (the ceiling).
    # the step's self-attention scores are materialized (not the fusable pattern)
    decode_act = b * text_per_token * unit + b * h * (s_max + 1) * 4  # one layer's
    decode_out = b * t.vocab_size * LOGIT_BYTES + n_self * b * kv_row  # logits, new K/V
    decode_scores = b * h * image_tokens_max * 4  # the cross-attention's, fused
    roof = DecodeRoofline(read_w, cross_cache_used, n_self * b * kv_row, b, g.bandwidth)
    decode_flops8 = 2 * p.decoder_linear * b
    decode_flops16 = 2 * p.lm_head * b + b * h * dh * 4 * (
        n_self * (s_max + 1) + n_cross * image_tokens
    )
    if precision != "fp8":
        decode_flops16, decode_flops8 = decode_flops16 + decode_flops8, 0
    decode_moved = roof.bytes_per_step(s_max)
    decode_s, decode_bound = _roofline(decode_flops16 * tf32, decode_flops8, decode_moved, g)

    image_desc = f"{b} x {images} image(s) x {n_tiles} tile(s)"
    vision = EngineMemory(
        "vision", p.vision_engine, vision_w, cross_cache, vision_act, 0, vision_scores,
        vision_flops16 + vision_flops8, vision_moved, vision_s, vision_bound, image_desc,
    )  # fmt: skip
    shared = text_engine == "shared"
    prefill = EngineMemory(
        "prefill", p.text_engine, 0 if shared else text_w, self_cache + cross_cache,
        prefill_act, prefill_out, prefill_scores, prefill_flops16 + prefill_flops8,
        prefill_moved, prefill_s, prefill_bound,
        f"{b} x {s} prompt tokens" + (f" in {pre.calls} call(s) of the decode engine"
                                      if shared else ""),
    )  # fmt: skip
    decode = EngineMemory(
        "decode", p.text_engine, text_w, self_cache + cross_cache, decode_act, decode_out,
        decode_scores, decode_flops16 + decode_flops8, decode_moved, decode_s, decode_bound,
        f"one step of {b} token(s), {s_max} cached",
    )  # fmt: skip
    # split: prefill and decode are two engines, two copies; shared: one engine, one copy
    weights = vision_w + (1 if shared else 2) * text_w
    scratch = max(vision_act, prefill_act, decode_act)  # one shared buffer
    outputs = max(prefill_out, decode_out)  # prefill's are freed before decode runs
    total = weights + self_cache + cross_cache + scratch + outputs
    return Plan(
        precision=precision,
        gpu=g,
        max_batch=b,
        max_seq_len=s_max,
        max_images=images,
        prompt_len=s,
        tiles=n_tiles,
        max_tiles=v.max_num_tiles,
        params=p,
        vision=vision,
        prefill=prefill,
        decode=decode,
        self_cache_bytes=self_cache,
        cross_cache_bytes=cross_cache,
        weight_bytes=weights,
        scratch_bytes=scratch,
        output_bytes=outputs,
        total_bytes=total,
        fits=total <= g.memory_bytes,
        text_engine=text_engine,
        step_tokens=pre.step_tokens,
        decode_roofline=roof,
        decode_floor_bytes=roof.bytes_per_step(0),
        decode_floor_seconds=roof.seconds_per_step(0),
        decode_ceiling_bytes=roof.bytes_per_step(s_max),
        decode_ceiling_seconds=roof.seconds_per_step(s_max),
    )


def _gb(n: float) -> str:
    return f"{n / GB:.2f}" if n == 0 or n >= 0.005 * GB else "<0.01"


def format_plan(p: Plan) -> str:
    """A fixed-width table for the terminal."""
    g = p.gpu
    lines = [
        f"precision {p.precision} on {g.name}: {g.memory_bytes / GB:.0f} GB, "
        f"{g.bandwidth / 1e12:.2f} TB/s, {g.bf16_flops / 1e12:.0f} / {g.fp8_flops / 1e12:.0f} "
        "TFLOP/s dense bf16 / fp8",
        f"profile maxima: batch {p.max_batch}, seq {p.max_seq_len}, images {p.max_images} "
        f"x {p.max_tiles} tiles; roofline at prompt {p.prompt_len}, {p.tiles} tile(s) per image",
        "",
        f"{'engine':<10}{'params':>10}{'weights':>10}{'caches':>10}{'scratch':>10}{'outputs':>10}"
        f"{'roofline':>12}  {'bound':<8}workload",
        f"{'':<10}{'(M)':>10}{'(GB)':>10}{'(GB)':>10}{'(GB)':>10}{'(GB)':>10}{'(lower)':>12}",
    ]
    shared = p.text_engine == "shared"
    for e in p.engines:
        held = "(decode)" if shared and e.name == "prefill" else _gb(e.weight_bytes)
        lines.append(
            f"{e.name:<10}{e.params / 1e6:>10.1f}{held:>10}{_gb(e.cache_bytes):>10}"
            f"{_gb(e.activation_bytes):>10}{_gb(e.output_bytes):>10}{duration(e.seconds):>12}  "
            f"{e.bound:<8}{e.roofline_at}"
        )
    caches = p.self_cache_bytes + p.cross_cache_bytes
    lines += [
        "-" * 82,
        f"{'total':<10}{'':>10}{_gb(p.weight_bytes):>10}{_gb(caches):>10}"
        f"{_gb(p.scratch_bytes):>10}{_gb(p.output_bytes):>10}",
        "",
        (
            f"weights: each engine holds its own; text engine shared: one decode engine serves "
            f"prefill too, the text weights once (at most {p.step_tokens} new tokens a call, "
            "longer prompts in chunks)"
            if shared
            else "weights: each engine holds its own; text engine split: prefill and decode "
            "hold the text weights twice"
        ),
        f"caches: self {_gb(p.self_cache_bytes)} GB + cross {_gb(p.cross_cache_bytes)} GB, "
        "each counted once",
        "scratch: one buffer shared by the execution contexts, the largest engine's; "
        + (
            "outputs: the last position's logits and one call's new K/V"
            if shared
            else "outputs: prefill's last-position logits and present K/V"
        ),
        f"memory: {_gb(p.total_bytes)} GB of {g.memory_bytes / GB:.0f} GB -> "
        + (
            f"fits, {_gb(p.free_bytes)} GB free"
            if p.fits
            else f"does NOT fit, {_gb(-p.free_bytes)} GB over"
        ),
        f"decode per step: {_gb(p.decode_floor_bytes)} GB read -> "
        f"{duration(p.decode_floor_seconds)} at an empty context, {_gb(p.decode_ceiling_bytes)} GB "
        f"-> {duration(p.decode_ceiling_seconds)} with {p.max_seq_len} cached",
        f"decode throughput at most: {p.max_batch / p.decode_floor_seconds:,.0f} tokens/s at an "
        f"empty context, {p.max_batch / p.decode_ceiling_seconds:,.0f} tokens/s when full",
        (
            "scratch counts the decode engine's self-attention scores (materialized, "
            "[B, H, N, past + N] float32) and assumes fused attention in vision and "
            "cross-attention; unfused scores would add "
            if shared
            else "scratch assumes fused attention in vision, prefill and cross-attention; "
            "unfused scores would add "
        )
        + ", ".join(f"{e.name} {_gb(e.attention_scores_bytes)}" for e in p.engines)
        + " GB",
    ]
    return "\n".join(lines)
