"""ONNX Runtime backend: one InferenceSession per graph, CPU or CUDA provider."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.spec import TensorSpec

from .backend import check_feed
from .store import TorchStore


def providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise MllamaExportError(
                f"--device cuda: this ONNX Runtime has no CUDA provider (it has {available}); "
                "install onnxruntime-gpu, or use --device cpu"
            )
        if not cuda_runs():
            raise MllamaExportError(
                "--device cuda: ONNX Runtime's CUDA provider is installed but cannot run here "
                "(no CUDA device, or the CUDA and cuDNN libraries onnxruntime-gpu needs are "
                "missing); use --device cpu, or install them"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise MllamaExportError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


@lru_cache(maxsize=1)
def cuda_runs() -> bool:
    """Whether the CUDA provider really runs: a session of one Identity node that asks for it
    falls back to the CPU, with a page of load errors, where it cannot (those are silenced)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CUDAExecutionProvider"]
        )
        return "CUDAExecutionProvider" in session.get_providers()
    except Exception:  # ORT raises its own untyped errors
        return False
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default: warnings


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        device: str = "cpu",
        optimization: str = "all",
        io_binding: bool = False,
        derived_dims: Mapping[str, tuple[str, int]] | None = None,
    ):
        import onnxruntime as ort

        self.inputs, self.outputs, self.label = inputs, outputs, Path(path).stem
        # output dims no input carries: dim -> (an input's dim, factor), such as Mllama's
        # image_tokens = num_images x tiles x patches (its session's derived_dims)
        self.derived_dims = dict(derived_dims or {})
        options = ort.SessionOptions()
        # FP8 Q/DQ graphs must stay at BASIC: higher levels fuse Q/DQ into int8-only kernels.
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        options.log_severity_level = 3
        chosen = providers(device)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as err:  # ORT raises its own untyped errors for unreadable models
            raise MllamaExportError(f"ONNX Runtime cannot load {path}: {err}") from err
        self._names = [s.name for s in outputs]
        # With I/O binding, inputs and outputs are torch tensors on the provider's device,
        # bound by pointer: caches stay there between calls and are never copied per step.
        self.store = TorchStore("cuda" if device == "cuda" else "cpu") if io_binding else None
        types = {o.type for o in self.session.get_outputs()} | {
            i.type for i in self.session.get_inputs()
        }
        if io_binding and not types <= _ORT_TYPES.keys():
            raise MllamaExportError(
                f"I/O binding supports {sorted(_ORT_TYPES)}; {Path(path).name} uses {sorted(types)} "
                "(ONNX Runtime's Python binding takes numpy types, and numpy has no bfloat16)"
            )
        self._out_meta = {
            o.name: (o.shape, _ORT_TYPES.get(o.type)) for o in self.session.get_outputs()
        }

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.label, self.inputs, feed)
        if self.store is not None:
            return self._infer_bound(feed)
        outs = self.session.run(self._names, feed)
        return dict(zip(self._names, outs, strict=True))

    def _infer_bound(self, feed: dict) -> dict:
        binding = self.session.io_binding()
        device = self.store.device
        where = (device.type, device.index or 0)
        sizes: dict[str, int] = {}
        tensors = {}
        for spec in self.inputs:
            tensor = self.store.put(feed[spec.name])
            tensors[spec.name] = tensor  # kept alive until the run ends
            sizes.update(zip(spec.dims, tensor.shape, strict=True))
            binding.bind_input(
                spec.name, *where, _numpy_type(tensor), tuple(tensor.shape), tensor.data_ptr()
            )
        for dim, (source, factor) in self.derived_dims.items():
            if source in sizes:
                sizes.setdefault(dim, sizes[source] * factor)
        outputs = {}
        for name in self._names:
            dims, dtype = self._out_meta[name]
            shape = tuple(d if isinstance(d, int) else sizes[d] for d in dims)
            outputs[name] = out = self.store.zeros(shape, dtype)
            binding.bind_output(name, *where, dtype, shape, out.data_ptr())
        self.session.run_with_iobinding(binding)
        return outputs


_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
}


def _numpy_type(tensor) -> np.dtype:
    import torch

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[
        tensor.dtype
    ]
