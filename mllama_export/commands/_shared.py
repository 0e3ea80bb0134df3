"""Options that several commands take, declared once."""

from __future__ import annotations

import click


def backend_option(help: str):
    return click.option(
        "--backend",
        # onnx-reference: slow, CPU only, runs bfloat16 (engines/onnxref.py)
        type=click.Choice(["onnxruntime", "onnx-reference", "tensorrt"]),
        default="onnxruntime",
        show_default=True,
        help=help,
    )


device_option = click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="cpu or cuda: ONNX Runtime's provider (TensorRT always runs on the GPU).",
)
