"""Weights as lazy sources, and one external-data file written a tensor at a time.

A graph is traced with no weights in memory (exporter/onnx_export.py); each initializer then
holds a :class:`SourceTensor` that knows how to produce its bytes (read one checkpoint tensor,
cast it, quantize it, transpose it) without producing them. :class:`WeightFile` writes them one
after the other, so that the export's peak memory is about one tensor, whatever the model.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype

from mllama_export.graphs import checkpoint as stored
from mllama_export.graphs.checkpoint import Checkpoint, checkpoint_format
from mllama_export.graphs.family import family_of
from mllama_export.graphs.progress import bar
from mllama_export.graphs.quant import FP8_DTYPE, FP8Linear, fp8_weight, scale_from_amax

# Smaller tensors stay inside the .onnx (as the exporters' own save does); tensors of 1 MiB or
# more start on a 64 KiB boundary, so that ONNX Runtime and TensorRT can map them in place.
INLINE_BYTES = 256
ALIGN_FROM_BYTES = 1 << 20
ALIGNMENT = 1 << 16


@dataclass(frozen=True)
class Source:
    """How to produce one weight, as consecutive blocks of its rows (row-major bytes in
    order), so that a writer never holds more than a block. ``key`` names its bytes: two
    graphs that need the same key share one copy in the weight file (prefill and decode hold
    the same text weights)."""

    key: Hashable
    blocks: Callable[[], Iterator[torch.Tensor]]
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, key: Hashable, make: Callable[[], torch.Tensor], dtype, shape) -> Source:
        """A source produced whole, for tensors no bigger than a layer's largest weight."""
        return cls(key, lambda: iter([make()]), dtype, tuple(shape))

    def read(self) -> torch.Tensor:
        """The whole tensor: one copy plus one block in memory."""
        whole = torch.empty(self.shape, dtype=self.dtype)
        flat, at = whole.view(-1), 0
        for block in self.blocks():
            flat[at : at + block.numel()] = block.reshape(-1)
            at += block.numel()
            del block  # before the next block is read, not after
        return whole

    def transposed(self, perm: tuple[int, ...]) -> Source:
        """The source with its dims permuted. A 2-D transpose holds the source whole (a row
        of the result is a column of it) and hands the result out in blocks of rows."""
        shape = tuple(self.shape[p] for p in perm)

        def blocks() -> Iterator[torch.Tensor]:
            whole = self.read()
            if perm != (1, 0):
                yield whole.permute(perm).contiguous()
                return
            row_bytes = whole.shape[0] * whole.element_size()
            step = max(1, stored.BLOCK_BYTES // max(row_bytes, 1))
            for start in range(0, whole.shape[1], step):
                yield whole[:, start : start + step].t().contiguous()

        return Source((self.key, "transpose", perm), blocks, self.dtype, shape)


class SourceTensor(ir.LazyTensor):
    """An initializer whose bytes are produced only when something asks for them."""

    __slots__ = ("source",)

    def __init__(self, source: Source, name: str):
        super().__init__(
            lambda: TorchTensor(source.read()),  # the optimizer reads small ones only
            dtype=from_torch_dtype(source.dtype),
            shape=ir.Shape(source.shape),
            name=name,
        )
        self.source = source


def checkpoint_sources(
    checkpoint: Checkpoint,
    model: torch.nn.Module,
    dtype: torch.dtype,
    input_amax: Mapping[str, float] | None = None,
) -> dict[str, Source]:
    """A source for every parameter and buffer of ``model`` (on the meta device, FP8 layers
    already in place): checkpoint tensors cast to ``dtype`` one at a time; FP8 weights and
    their scales quantized on the way from the float32 values, exactly as FP8Linear does."""
    sources = {}
    for name, tensor in model.named_parameters():
        sources[name] = _cast(checkpoint, name, dtype, tuple(tensor.shape))
    computed = checkpoint_format(family_of(checkpoint.config)).buffers(checkpoint.config)
    for name, t in computed.items():
        sources[name] = Source.of(("computed", name), lambda t=t: t, t.dtype, t.shape)
    for prefix, layer in model.named_modules():
        if isinstance(layer, FP8Linear):
            sources.update(_fp8_sources(checkpoint, prefix, layer, input_amax[prefix]))
    return sources


def tensor_sources(model: torch.nn.Module) -> dict[str, Source]:
    """Sources over a model already in memory (its tensors as they are)."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    return {
        name: Source.of(("tensor", id(t)), lambda t=t: t.detach(), t.dtype, t.shape)
        for name, t in named.items()
        if t is not None
    }


def _cast(checkpoint: Checkpoint, name: str, dtype: torch.dtype, shape: tuple) -> Source:
    return Source((name, dtype), lambda: checkpoint.blocks(name, dtype), dtype, shape)


def _fp8_sources(
    checkpoint: Checkpoint, prefix: str, layer: FP8Linear, amax: float
) -> dict[str, Source]:
    weight = f"{prefix}.weight"
    dtype, scheme = layer.weight_scale.dtype, layer.scheme
    out_in = (layer.out_features, layer.in_features)

    def quantized(part: int) -> torch.Tensor:
        return fp8_weight(checkpoint.read(weight).float(), dtype, scheme)[part]

    # quantized whole: a scale is the max over the tensor (or a row), and the FP8 weight is
    # stored [in, out]
    scale_shape = () if scheme == "per-tensor" else out_in[:1]
    sources = {
        weight: Source.of((weight, "fp8", scheme), lambda: quantized(0), FP8_DTYPE, out_in[::-1]),
        f"{prefix}.weight_scale": Source.of(
            (weight, "fp8-scale", scheme, dtype), lambda: quantized(1), dtype, scale_shape
        ),
        f"{prefix}.input_scale": Source.of(
            (prefix, "input-scale", amax, dtype),
            lambda: scale_from_amax(torch.tensor(amax), dtype),
            dtype,
            (),
        ),
    }
    if layer.bias is not None:
        sources[f"{prefix}.bias"] = _cast(checkpoint, f"{prefix}.bias", dtype, out_in[:1])
    return sources


class WeightFile:
    """One external-data file, append-only. A key written before is pointed at, not written
    again; each tensor is produced, written and dropped before the next is asked for."""

    def __init__(self, path: Path):
        self.path = path
        self.written: dict[Hashable, tuple[int, int]] = {}
        self.bytes_written = 0  # this file's new bytes: what the manifest reports per graph
        self._file = path.open("wb")

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def externalize(self, model: ir.Model, folder: Path) -> None:
        """Points every large initializer of ``model`` (which will be saved in ``folder``) at
        this file, writing what is not in it yet; small ones are materialized inline."""
        location = self.path.relative_to(folder).as_posix()
        values = list(model.graph.initializers.values())
        total = sum(v.const_value.nbytes for v in values)
        for value in bar(values, total, "writing weights", "B", lambda v: v.const_value.nbytes):
            tensor = value.const_value
            if tensor.nbytes < INLINE_BYTES:
                value.const_value = ir.Tensor(tensor.numpy(), name=value.name)
                continue
            offset, length = self._put(tensor)
            value.const_value = ir.ExternalTensor(
                location,
                offset,
                length,
                tensor.dtype,
                shape=tensor.shape,
                name=value.name,
                base_dir=folder,
            )

    def _put(self, tensor: ir.TensorProtocol) -> tuple[int, int]:
        key = tensor.source.key if isinstance(tensor, SourceTensor) else None
        if key is not None and key in self.written:
            return self.written[key]
        if tensor.nbytes >= ALIGN_FROM_BYTES:
            self._file.seek(-self._file.tell() % ALIGNMENT, 1)
        offset = self._file.tell()
        if isinstance(tensor, SourceTensor):
            for block in tensor.source.blocks():
                self._write_torch(block)
                del block  # before the next block is read, not after
        else:
            self._file.write(tensor.tobytes())
        length = self._file.tell() - offset
        self.bytes_written += length
        if length != tensor.nbytes:
            raise AssertionError(f"{tensor.name}: wrote {length} bytes, expected {tensor.nbytes}")
        if key is not None:
            self.written[key] = (offset, length)
        return offset, length

    def _write_torch(self, tensor: torch.Tensor) -> None:
        # ONNX stores little-endian row-major bytes, which is a CPU tensor's memory as it is:
        # written through a byte view, with no copy.
        flat = tensor.detach().contiguous().reshape(-1)
        self._file.write(flat.view(torch.uint8).numpy().data)


def bind_sources(model: ir.Model, sources: Mapping[str, Source]) -> None:
    """Gives every initializer of a traced ``model`` its source; the exporter names
    initializers by their tensor's path in the graph module, as ``sources`` does."""
    for value in model.graph.initializers.values():
        source = sources[value.name]
        traced = (tuple(value.shape or ()), value.dtype)
        if traced != (source.shape, from_torch_dtype(source.dtype)):
            raise AssertionError(
                f"{value.name}: traced {traced}, source {source.shape} {source.dtype}"
            )
        value.const_value = SourceTensor(source, value.name)


def graph_names(graph: torch.nn.Module, model: torch.nn.Module) -> dict[str, str]:
    """{path in the graph module: path in the model} for every tensor the graph holds."""

    def tensors(module: torch.nn.Module):
        yield from module.named_parameters(remove_duplicate=False)
        yield from module.named_buffers(remove_duplicate=False)

    in_model = {id(t): name for name, t in tensors(model) if t is not None}
    return {name: in_model[id(t)] for name, t in tensors(graph) if t is not None}


def fold_weight_transposes(model: ir.Model) -> None:
    """Transpose(W) of a weight becomes a transposed weight, produced lazily like the rest.

    The exporter writes Linear as MatMul(x, Transpose(W)); its optimizer folds the Transpose
    by computing it, which would pull every weight into memory at once.
    """
    graph = model.graph
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.domain == "" else None
        if source is None or not isinstance(source.const_value, SourceTensor):
            continue
        perm = tuple(node.attributes["perm"].as_ints())
        name = f"{source.name}.transposed"
        folded = ir.Value(name=name, shape=None, type=source.type)
        folded.const_value = SourceTensor(source.const_value.source.transposed(perm), name)
        folded.shape = ir.Shape(folded.const_value.shape)
        graph.register_initializer(folded)
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        if not source.uses():
            graph.initializers.pop(source.name)


__all__ = [
    "Source",
    "SourceTensor",
    "WeightFile",
    "bind_sources",
    "checkpoint_sources",
    "fold_weight_transposes",
    "graph_names",
    "tensor_sources",
]
