"""FP8 (E4M3) fake quantization that exports as real ONNX QuantizeLinear/DequantizeLinear.

The form TensorRT recommends for FP8 (explicit quantization, strongly typed network, no
precision flags): every quantized GEMM reads

    x --QuantizeLinear(s_x)--> float8e4m3fn --DequantizeLinear(s_x)--> MatMul <-- DequantizeLinear(s_w) <-- W8

with a per-tensor activation scale ``s_x`` (a constant); ``W8`` is a float8e4m3fn initializer
of shape ``[in, out]`` (stored transposed, so that the MatMul reads it as it is: no Transpose
between the DequantizeLinear and the MatMul). Two weight-scale schemes (WEIGHT_SCHEMES):

- ``per-tensor`` (default): ``s_w`` is one scalar, the DequantizeLinear has no axis. Scalar
  scales on both GEMM inputs are what TensorRT's FP8 GEMM fusion recognizes (docs/tensorrt.md)
  and what Model Optimizer's FP8_DEFAULT_CFG writes.
- ``per-channel``: ``s_w`` has one scale per output channel, ``DequantizeLinear(axis=1)``.

Everything else stays in the graph's 16-bit (or 32-bit) type.

Custom ops carry this through ``torch.export``; their eager kernels are the PyTorch reference
(fake quantization) and :data:`ONNX_TRANSLATIONS` turns them into the standard ONNX ops at
export. Both sides compute ``x / s`` in float32, round to nearest even with saturation to
+-448 (the ONNX ``saturate=1`` default), and multiply back in float32 before rounding once to
the graph's type, which is what ONNX Runtime's CPU kernels do.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import torch
from torch import nn

from mllama_export.errors import MllamaExportError

from .choices import WEIGHT_SCHEMES

FP8_MAX = 448.0  # largest finite float8e4m3fn
FP8_DTYPE = torch.float8_e4m3fn


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """float8e4m3fn of ``x`` (any float dtype): round to nearest even, saturate to +-448,
    NaN stays NaN (infinities saturate, as ONNX QuantizeLinear with saturate=1)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


@torch.library.custom_op("mllama_export::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear with one scale: x rounded onto the FP8 grid."""
    s = scale.float()
    return (to_fp8(x.float() / s).float() * s).to(x.dtype)


@fp8_qdq.register_fake
def _(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("mllama_export::fp8_dequantize", mutates_args=())
def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """DequantizeLinear of an FP8 tensor with per-channel scales along ``axis``."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return (q.float() * scale.float().view(shape)).to(scale.dtype)


@fp8_dequantize.register_fake
def _(q, scale, axis):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


@torch.library.custom_op("mllama_export::fp8_dequantize_tensor", mutates_args=())
def fp8_dequantize_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DequantizeLinear of an FP8 tensor with one scalar scale (no axis)."""
    return (q.float() * scale.float()).to(scale.dtype)


@fp8_dequantize_tensor.register_fake
def _(q, scale):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


def _qdq_onnx(x, scale):
    from onnxscript import ir
    from onnxscript import opset19 as op

    # QuantizeLinear's output type is its zero point's: an FP8 zero makes it float8e4m3fn.
    zero = op.Constant(value=ir.tensor(np.zeros((), ml_dtypes.float8_e4m3fn), name="fp8_zero"))
    # scalar scales: no axis attribute (onnxscript would write its default, axis=1)
    q = op.QuantizeLinear(x, scale, zero, axis=None, saturate=1)
    return op.DequantizeLinear(q, scale, axis=None)


def _dequantize_onnx(q, scale, axis: int):
    from onnxscript import opset19 as op

    return op.DequantizeLinear(q, scale, axis=axis)


def _dequantize_tensor_onnx(q, scale):
    from onnxscript import opset19 as op

    return op.DequantizeLinear(q, scale, axis=None)  # a scalar scale: per tensor, no axis


# torch.onnx.export(custom_translation_table=...): the custom ops as standard ONNX ops.
ONNX_TRANSLATIONS = {
    torch.ops.mllama_export.fp8_qdq.default: _qdq_onnx,
    torch.ops.mllama_export.fp8_dequantize.default: _dequantize_onnx,
    torch.ops.mllama_export.fp8_dequantize_tensor.default: _dequantize_tensor_onnx,
}


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """amax / 448 in ``dtype`` (the scale is a tensor of the graph's type in ONNX), never zero
    or subnormal: an all-zero channel or activation gets the smallest normal scale."""
    tiny = torch.finfo(dtype).tiny
    return (amax.float() / FP8_MAX).clamp(min=tiny).to(dtype)


def fp8_weight(
    weight: torch.Tensor, dtype: torch.dtype, scheme: str = "per-tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear weight [out, in] -> (float8e4m3fn [in, out], its scale in ``dtype``: a scalar
    (``per-tensor``) or one per output channel, [out] (``per-channel``)), quantized from its
    float32 values. The streaming export (exporter/weightfile.py) calls this on each
    checkpoint tensor, so its bytes are FP8Linear's."""
    check_scheme(scheme)
    w = weight.float()
    if scheme == "per-tensor":
        scale = scale_from_amax(w.abs().amax(), dtype)
        return to_fp8(w / scale.float()).t().contiguous(), scale
    scale = scale_from_amax(w.abs().amax(dim=1), dtype)
    return to_fp8(w / scale.float()[:, None]).t().contiguous(), scale


def check_scheme(scheme: str) -> None:
    if scheme not in WEIGHT_SCHEMES:
        raise MllamaExportError(
            f"FP8 weight scheme {scheme!r}; available: {', '.join(WEIGHT_SCHEMES)}"
        )


class FP8Linear(nn.Module):
    """A Linear whose input and weight are FP8: weights stored as float8e4m3fn [in, out] with
    one scale (``per-tensor``) or one per output channel (``per-channel``), the input
    quantized per tensor with a calibrated scale."""

    WEIGHT_DTYPE = FP8_DTYPE

    def __init__(
        self,
        linear: nn.Linear,
        input_amax: float,
        dtype: torch.dtype,
        scheme: str = "per-tensor",
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = scheme
        weight, weight_scale = fp8_weight(linear.weight.detach(), dtype, scheme)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", scale_from_amax(torch.tensor(input_amax), dtype))
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not turn the FP8 weight into 16 bits: only the device moves.
        weight = self.weight
        super()._apply(fn, recurse)
        self.weight = weight.to(self.weight_scale.device)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        # [in, out] in the scale's dtype: what the weight's DequantizeLinear outputs
        if self.scheme == "per-tensor":
            return fp8_dequantize_tensor(self.weight, self.weight_scale)
        return fp8_dequantize(self.weight, self.weight_scale, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        y = torch.matmul(fp8_qdq(x, self.input_scale), self.dequantized_weight())
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        # a layer on the meta device (the streaming export's) has no scale value to show
        scale = "meta" if self.input_scale.is_meta else f"{float(self.input_scale):.3e}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weights={self.scheme}, input_scale={scale}"
        )


def quantizable_linears(
    model: nn.Module, vision: bool = False, exclude: Sequence[str] = ()
) -> list[str]:
    """Names of the Linear layers FP8 quantizes in a family's model, in module order.

    The model's class says which, by path prefix: ``FP8_PREFIXES`` by default (the text
    decoder's attention projections and MLPs; never the embeddings, lm_head or norms) and
    ``FP8_VISION_PREFIXES`` as well with ``vision`` (the vision encoder's and the projector's).
    ``exclude``: glob patterns (fnmatch) of layers to keep in 16 bits; each must match a layer.
    """
    names = _linears(model, vision)
    excluded = match_layers(
        names, exclude, "--fp8-exclude", also=() if vision else _linears(model, True)
    )
    return [name for name in names if name not in excluded]


def _linears(model: nn.Module, vision: bool) -> list[str]:
    cls = type(model)
    if not hasattr(cls, "FP8_PREFIXES"):
        raise MllamaExportError(
            f"{cls.__name__} declares no FP8_PREFIXES; expected a family's model class that "
            "names the Linears FP8 quantizes (FP8_PREFIXES, and FP8_VISION_PREFIXES)"
        )
    prefixes = cls.FP8_PREFIXES + (getattr(cls, "FP8_VISION_PREFIXES", ()) if vision else ())
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefixes)
    ]


def match_layers(
    names: Sequence[str], patterns: Sequence[str], what: str, also: Sequence[str] = ()
) -> set[str]:
    """The ``names`` any of the glob ``patterns`` matches; a pattern matching none is an error
    (a typo would otherwise silently select nothing). ``also``: the layers --fp8-vision
    would add, named in the error when the pattern matches those."""
    matched: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            examples = ", ".join(names[:3]) + (f" ... ({len(names)} in all)" if names else "")
            vision = fnmatch.filter(list(also), pattern) and not set(also) <= set(names)
            hint = (
                "; it matches vision-encoder layers, which are FP8 (and so excludable or "
                "rankable) only in builds with --fp8-vision"
                if vision
                else ""
            )
            raise MllamaExportError(
                f"{what} {pattern!r} matches none of the FP8-quantizable layers "
                f"(glob patterns on layer names such as {examples or 'none'}){hint}"
            )
        matched.update(hits)
    return matched


def quantize_model(
    model: nn.Module,
    input_amax: dict[str, float],
    dtype: torch.dtype,
    scheme: str = "per-tensor",
) -> None:
    """Casts ``model``'s parameters (float32) to ``dtype`` and replaces every Linear named in
    ``input_amax`` by an FP8Linear with that calibrated input amax and weight ``scheme``;
    weights are quantized from their float32 values."""
    replacements = {}
    for name, amax in input_amax.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not a Linear")
        replacements[name] = FP8Linear(linear, amax, dtype, scheme)
    with torch.no_grad():  # parameters only, as load_model casts: RoPE's inv_freq stays float32
        for param in model.parameters():
            param.data = param.data.to(dtype)
    for name, module in replacements.items():
        replace_module(model, name, module)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Puts ``module`` at the dotted path ``name`` of ``model``; returns the one it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old
