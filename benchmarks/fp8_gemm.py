"""FP8 on the device: our fake quantization against real FP8 matrix products, and FP8 vs bf16.

    python benchmarks/fp8_gemm.py numerics [--device cuda] [--tokens 256] [--scheme both]
    python benchmarks/fp8_gemm.py timing [--device cuda] [--repeats 50] [--scheme both]

Both weight-scale schemes of `build --fp8-weights` (graphs/quant.py), ``--scheme per-tensor``,
``per-channel`` or ``both`` (default):

- ``per-tensor``: one scale for the input and one for the weight, ``torch._scaled_mm`` with
  scalar scales (tensor-wise scaling: the GEMM TensorRT fuses our default graphs into);
- ``per-channel``: the per-tensor input scale broadcast to rows and one scale per output
  channel, ``torch._scaled_mm`` with row-wise scales ([M, 1] and [1, N]).

``numerics``: for each linear of an 11B decoder layer (Llama 3.2 Vision 11B's text
geometry), random activations with a few outlier channels go through ``FP8Linear`` (what the
exported Q/DQ graph computes, in a float32 base) and through ``torch._scaled_mm`` on the very
same FP8 bytes:

- ``exact``: unit scales and float32 out, then the scales applied in float32. This holds
  the device's FP8 products and accumulation against our dequantize-then-matmul: they
  differ only by float32 summation order.
- ``scaled``: the scheme's scales as the kernel's own epilogue, bf16 out (how an FP8 GEMM
  runs it in an engine).
- ``fast_accum``: ``scaled`` with ``use_fast_accum=True`` (Hopper's reduced-precision
  accumulation).

``timing``: one 11B decoder layer (RMSNorm, q/k/v/o, SDPA over a KV cache, gate/up/down) with
bf16 GEMMs against FP8 GEMMs of each scheme (the input quantized per tensor with a static
scale, bf16 out); everything else is the same code. Medians of device timings, side by side
in one process; the ratios are the figures.

``--small`` runs a small layer instead (a CPU smoke run of the same code; tests/test_fp8.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mllama_export.graphs.quant import WEIGHT_SCHEMES, FP8Linear, to_fp8


@dataclass(frozen=True)
class Geometry:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    def linears(self) -> dict[str, tuple[int, int]]:
        """{name: (in, out)} of one decoder layer's GEMMs."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


# Llama 3.2 Vision 11B's text decoder (config.json text_config), and a CPU smoke size
FULL = Geometry(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128)
SMALL = Geometry(hidden=256, intermediate=896, heads=4, kv_heads=2, head_dim=64)


def _col_major(w: torch.Tensor) -> torch.Tensor:
    # _scaled_mm wants its second operand column-major
    return w.t().contiguous().t()


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm()), float((a - b).abs().max() / b.abs().max())


def _scales(sx: torch.Tensor, sw: torch.Tensor, rows: int, n: int):
    """_scaled_mm's (scale_a, scale_b): scalars (tensor-wise) for a scalar weight scale,
    else row-wise, [rows, 1] and [1, n]."""
    if sw.dim() == 0:
        return sx, sw
    return sx.expand(rows, 1).contiguous(), sw.view(1, n)


def numerics(
    device: str, tokens: int, geometry: Geometry, seed: int = 0, scheme: str = "per-tensor"
) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name, (k, n) in geometry.linears().items():
        x = torch.randn(tokens, k, generator=gen)
        x[:, :4] *= 20  # outlier channels, as real LLM activations have
        linear = nn.Linear(k, n, bias=False)
        linear.weight.data = torch.randn(n, k, generator=gen) * k**-0.5
        layer = FP8Linear(linear, float(x.abs().max()), torch.float32, scheme)
        with torch.no_grad():
            fake = layer(x)
        xq = to_fp8(x / layer.input_scale).to(device)
        wq = _col_major(layer.weight).to(device)
        sx, sw = layer.input_scale.float().to(device), layer.weight_scale.float().to(device)
        one = torch.ones((), device=device)
        raw = torch._scaled_mm(xq, wq, scale_a=one, scale_b=one, out_dtype=torch.float32)
        row = {"layer": name, "scheme": scheme, "shape": f"[{tokens}, {k}] x [{k}, {n}]"}
        row["exact"] = _rel(raw * sx * sw.reshape(1, -1), fake)
        scale_a, scale_b = _scales(sx, sw, tokens, n)
        for label, fast in (("scaled", False), ("fast_accum", True)):
            try:
                out = torch._scaled_mm(
                    xq,
                    wq,
                    scale_a=scale_a,
                    scale_b=scale_b,
                    out_dtype=torch.bfloat16,
                    use_fast_accum=fast,
                )
                row[label] = _rel(out, fake)
            except RuntimeError as err:  # not every device has every scaling
                row[label] = f"unsupported: {str(err).splitlines()[0][:60]}"
        rows.append(row)
    return rows


class DecoderLayer:
    """An 11B decoder layer's weights, in bf16 and in FP8 (``scheme``'s weight scales), with
    one forward that takes the GEMM as an argument: the runs differ in nothing else."""

    def __init__(self, device: str, geometry: Geometry, seed: int = 0, scheme="per-tensor"):
        gen = torch.Generator().manual_seed(seed)
        self.g = geometry
        self.bf16, self.fp8 = {}, {}
        for name, (k, n) in geometry.linears().items():
            linear = nn.Linear(k, n, bias=False)
            linear.weight.data = torch.randn(n, k, generator=gen) * k**-0.5
            layer = FP8Linear(linear, 4.0, torch.float32, scheme)
            self.bf16[name] = linear.weight.data.t().contiguous().to(device, torch.bfloat16)
            self.fp8[name] = (
                _col_major(layer.weight).to(device),
                layer.weight_scale.float().to(device),
            )
        # static, as calibrated: every layer saw the same input amax
        self.scale = layer.input_scale.float().to(device)

    def gemm_bf16(self, name: str, h: torch.Tensor) -> torch.Tensor:
        return h @ self.bf16[name]

    def gemm_fp8(self, name: str, h: torch.Tensor) -> torch.Tensor:
        w, sw = self.fp8[name]
        flat = h.reshape(-1, h.shape[-1])
        hq = to_fp8(flat.float() / self.scale)
        scale_a, scale_b = _scales(self.scale, sw, flat.shape[0], w.shape[1])
        out = torch._scaled_mm(hq, w, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        return out.view(*h.shape[:-1], -1)

    def forward(self, x, past_k, past_v, gemm: Callable) -> torch.Tensor:
        # x: [B, T, hidden]; past_k, past_v: [B, H_kv, P, D]
        b, t, _ = x.shape
        g = self.g
        h = F.rms_norm(x, (x.shape[-1],))
        q = gemm("q_proj", h).view(b, t, g.heads, g.head_dim).transpose(1, 2)
        k = gemm("k_proj", h).view(b, t, g.kv_heads, g.head_dim).transpose(1, 2)
        v = gemm("v_proj", h).view(b, t, g.kv_heads, g.head_dim).transpose(1, 2)
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        attn = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        x = x + gemm("o_proj", attn.transpose(1, 2).reshape(b, t, -1))
        h = F.rms_norm(x, (x.shape[-1],))
        return x + gemm("down_proj", F.silu(gemm("gate_proj", h)) * gemm("up_proj", h))


def _median_ms(fn: Callable, device: str, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# (label, batch, new tokens, past length): decode steps at several batches, and prefills
CASES = [
    ("decode", 16, 1, 1024),
    ("decode", 64, 1, 1024),
    ("decode", 128, 1, 2048),
    ("prefill", 1, 512, 0),
    ("prefill", 1, 2048, 0),
    ("prefill", 4, 2048, 0),
]


def timing(
    device: str, geometry: Geometry, repeats: int, cases=CASES, schemes=WEIGHT_SCHEMES
) -> list[dict]:
    layers = {scheme: DecoderLayer(device, geometry, scheme=scheme) for scheme in schemes}
    bf16 = next(iter(layers.values())).gemm_bf16  # the same bf16 weights in every layer
    g = geometry
    rows = []
    for label, b, t, past in cases:
        x = torch.randn(b, t, g.hidden, device=device, dtype=torch.bfloat16)
        pk = torch.randn(b, g.kv_heads, past, g.head_dim, device=device, dtype=torch.bfloat16)
        pv = torch.randn_like(pk)
        gemms = {"bf16": bf16} | {f"fp8 {s}": layer.gemm_fp8 for s, layer in layers.items()}
        ms = {}
        with torch.inference_mode():
            for name, gemm in gemms.items():
                layer = next(iter(layers.values()))
                args = (x, pk, pv, gemm)
                ms[name] = _median_ms(lambda a=args, f=layer.forward: f(*a), device, repeats)
        speedups = {f"bf16 / {k}": ms["bf16"] / v for k, v in ms.items() if k != "bf16"}
        rows.append({"case": label, "batch": b, "tokens": t, "past": past, **ms, **speedups})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["numerics", "timing"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--scheme", choices=[*WEIGHT_SCHEMES, "both"], default="both")
    parser.add_argument("--small", action="store_true", help="a small layer (CPU smoke run)")
    args = parser.parse_args()
    geometry = SMALL if args.small else FULL
    schemes = WEIGHT_SCHEMES if args.scheme == "both" else (args.scheme,)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {geometry}")
    if args.what == "numerics":
        print("| layer | weights | GEMM | exact: rel L2, max | scaled bf16 | fast_accum bf16 |")
        print("|---|---|---|---|---|---|")
        for scheme in schemes:
            for r in numerics(args.device, args.tokens, geometry, scheme=scheme):
                cells = [
                    f"{v[0]:.1e}, {v[1]:.1e}" if isinstance(v, tuple) else v
                    for v in (r["exact"], r["scaled"], r["fast_accum"])
                ]
                print(f"| {r['layer']} | {scheme} | {r['shape']} | " + " | ".join(cells) + " |")
        return
    rows = timing(args.device, geometry, args.repeats, schemes=schemes)
    timed = [k for k in rows[0] if k not in ("case", "batch", "tokens", "past")]
    print("| case | batch | new tokens | past | " + " | ".join(timed) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(timed))
    for r in rows:
        cells = " | ".join(f"{r[k]:.3f}" if "/" not in k else f"{r[k]:.2f}" for k in timed)
        print(f"| {r['case']} | {r['batch']} | {r['tokens']} | {r['past']} | {cells} |")


if __name__ == "__main__":
    main()
