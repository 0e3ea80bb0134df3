from __future__ import annotations

from pathlib import Path

import click


@click.command("build")
@click.option(
    "--model",
    required=True,
    help="Checkpoint folder (config.json + safetensors), or a preset: tiny, 11b, 90b "
    "(a synthetic checkpoint with random weights).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Artifact folder to write."
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "fp8"]),
    default="fp32",
    show_default=True,
    help="Precision of the graphs' weights and activations. fp8: the text decoder's linear "
    "layers get FP8 (E4M3) weights and inputs as explicit Q/DQ in the ONNX, scales calibrated "
    "on the built-in evaluation set; everything else is fp16.",
)
@click.option(
    "--max-batch", type=int, default=4, show_default=True, help="Largest batch of prompts."
)
@click.option(
    "--max-seq-len",
    type=int,
    default=512,
    show_default=True,
    help="Longest prompt plus generated tokens.",
)
@click.option(
    "--max-images", type=int, default=2, show_default=True, help="Most images per prompt."
)
@click.option(
    "--xattn-mask",
    type=click.Choice(["meta", "hf"]),
    default="meta",
    show_default=True,
    help="meta: Meta's reference (text before any image ignores images; the trained "
    "behaviour). hf: bit-compatible with transformers 5.x.",
)
@click.option("--opset", type=int, default=19, show_default=True, help="ONNX opset (19 to 21).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for preset weights.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--fp8-vision",
    is_flag=True,
    help="With --precision fp8: quantize the vision encoder's and the projector's linear "
    "layers too (default: the vision encoder stays fp16).",
)
@click.option(
    "--fp8-exclude",
    multiple=True,
    metavar="PATTERN",
    help="With --precision fp8: keep the layers matching this glob in 16 bits (repeatable), "
    "e.g. 'vision.global_transformer.*'; `mllama-export sensitivity` ranks the candidates.",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    default=None,
    help="With --precision fp8: calibrate on this folder (prompts.jsonl and its images, the "
    "format of `validate --evalset`)  [default: the built-in evaluation set]",
)
@click.option(
    "--fp8-weights",
    type=click.Choice(["per-tensor", "per-channel"]),
    default="per-tensor",
    show_default=True,
    help="With --precision fp8: one FP8 weight scale per tensor (the layout TensorRT's FP8 GEMM "
    "fusion recognizes, docs/tensorrt.md) or one per output channel.",
)
@click.option(
    "--check-depth",
    type=click.Choice(["auto", "full", "reduced"]),
    default="auto",
    show_default=True,
    help="The check of each graph against PyTorch: on the whole model, or on a copy of its "
    "first layers (full size on a small machine). auto: full when it fits in memory.",
)
@click.option(
    "--engines",
    type=click.Choice(["auto", "skip", "require"]),
    default="auto",
    show_default=True,
    help="TensorRT engines, built after the ONNX artifacts are complete. auto: where "
    "TensorRT and a CUDA GPU exist, else say why not; skip: none (build them later with "
    "`mllama-export engines DIR`); require: exit 2 before any work where they cannot be built.",
)
def command(**options):
    """Export the vision, prefill and decode graphs to ONNX, check them against PyTorch, and
    write them with a manifest; then build the TensorRT engines into the same folder (a
    failed engine keeps the ONNX: retry with `mllama-export engines DIR`)."""
    from mllama_export.exporter.build import build
    from mllama_export.exporter.manifest import read_manifest, summarize_check
    from mllama_export.exporter.options import BuildOptions

    # Every option is named after its BuildOptions field.
    options = BuildOptions(**{**options, "fp8_exclude": tuple(options["fp8_exclude"])})
    out = options.out
    build(options, progress=lambda msg: click.echo(f"  {msg}", err=True))
    manifest = read_manifest(out)
    for name, graph in manifest["graphs"].items():
        click.echo(f"{name:8s} {graph['file']}  (vs PyTorch: {summarize_check(graph['check'])})")
    tensorrt = manifest["tensorrt"]
    if tensorrt.get("built"):
        click.echo(f"TensorRT engines built in {out / 'engines'}")
    else:
        click.echo(f"TensorRT engines not built: {tensorrt.get('reason', 'not recorded')}")
    click.echo(f"wrote {out}")
