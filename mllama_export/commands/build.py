from __future__ import annotations

from pathlib import Path

import click

from mllama_export.graphs.choices import (
    CHECK_DEPTHS,
    DEFAULT_MASK,
    DEFAULT_MAX_SEQ_LEN,
    DEFAULT_TEXT_ENGINE,
    ENGINE_MODES,
    MASK_SEMANTICS,
    PRECISIONS,
    TEXT_ENGINES,
    WEIGHT_SCHEMES,
)

from ._shared import preset_names


@click.command("build")
@click.option(
    "--model",
    required=True,
    help="Checkpoint folder (config.json + safetensors), a Hugging Face Hub id (found in, or "
    f"downloaded into, the Hugging Face cache), or a preset: {', '.join(preset_names())} (a synthetic "
    "checkpoint with random weights).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Artifact folder to write."
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
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
    default=None,
    help="Longest prompt plus generated tokens  [default: "
    f"{DEFAULT_MAX_SEQ_LEN}; LLaVA: room for --max-images of its largest images and 256 tokens "
    "of text, in steps of 512]",
)
@click.option(
    "--max-images", type=int, default=2, show_default=True, help="Most images per prompt."
)
@click.option(
    "--xattn-mask",
    type=click.Choice(MASK_SEMANTICS),
    default=None,
    help="Mllama's cross-attention mask. meta: Meta's reference (text before any image "
    "ignores images; the trained behaviour). hf: bit-compatible with transformers 5.x. "
    f"[default: {DEFAULT_MASK}; refused for LLaVA, which has no cross-attention]",
)
@click.option("--opset", type=int, default=19, show_default=True, help="ONNX opset (19 to 21).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for preset weights.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace --out if an earlier build wrote it (a folder holding anything else is "
    "refused, with or without --force).",
)
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
    "e.g. 'text.layers.0.*' (vision layers only with --fp8-vision); `mllama-export "
    "sensitivity` ranks the candidates.",
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
    type=click.Choice(WEIGHT_SCHEMES),
    default="per-tensor",
    show_default=True,
    help="With --precision fp8: one FP8 weight scale per tensor (the layout TensorRT's FP8 GEMM "
    "fusion recognizes, docs/tensorrt.md) or one per output channel.",
)
@click.option(
    "--check-depth",
    type=click.Choice(CHECK_DEPTHS),
    default="auto",
    show_default=True,
    help="The check of each graph against PyTorch: on the whole model, or on a reduced copy "
    "(one self- and the first cross-attention layer, one local and one global vision layer, "
    "4096 vocabulary rows; full size on a small machine). auto: full when the memory estimate "
    "fits, else reduced; refused up front when neither fits.",
)
@click.option(
    "--engines",
    type=click.Choice(ENGINE_MODES),
    default="auto",
    show_default=True,
    help="TensorRT engines, built after the ONNX artifacts are complete. auto: where "
    "TensorRT and a CUDA GPU exist, else say why not; skip: none (build them later with "
    "`mllama-export engines DIR`); require: exit 2 before any work where they cannot be built.",
)
@click.option(
    "--text-engine",
    type=click.Choice(TEXT_ENGINES),
    default=DEFAULT_TEXT_ENGINE,
    show_default=True,
    help="TensorRT text engines. split: a prefill and a decode engine, each holding the text "
    "weights. shared: one engine of the decode (step) graph for both phases, the text weights "
    "once (prefill profiles against a one-slot past, decode and chunk profiles; longer "
    "prompts are prefilled in chunks). The ONNX graphs are the same either way.",
)
def command(**options):
    """Export the vision, prefill and decode graphs to ONNX, check them against PyTorch, and
    write them with a manifest; then build the TensorRT engines into the same folder (a
    failed engine keeps the ONNX: retry with `mllama-export engines DIR`).

    \b
    Examples:
      mllama-export build --model tiny --out out/tiny --force
      mllama-export build --model ckpt/tiny --out out/tiny-fp16 --precision fp16 --check-depth reduced
      mllama-export build --model ckpt/tiny --out out/tiny-fp8 --precision fp8 --fp8-exclude 'text.layers.0.*'
    """
    from mllama_export.engines.manifest_read import read_manifest
    from mllama_export.exporter.build import build
    from mllama_export.exporter.manifest import summarize_check
    from mllama_export.exporter.options import BuildOptions

    # Every option is named after its BuildOptions field.
    options = BuildOptions(**{**options, "fp8_exclude": tuple(options["fp8_exclude"])})
    out = options.out
    build(options)
    manifest = read_manifest(out)
    for name, graph in manifest["graphs"].items():
        click.echo(f"{name:8s} {graph['file']}  (vs PyTorch: {summarize_check(graph['check'])})")
    tensorrt = manifest["tensorrt"]
    if tensorrt.get("built"):
        click.echo(f"TensorRT engines built in {out / 'engines'}")
    else:
        click.echo(f"TensorRT engines not built: {tensorrt.get('reason', 'not recorded')}")
    click.echo(f"wrote {out}")
