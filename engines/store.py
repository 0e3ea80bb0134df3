"""Where a backend keeps tensors between calls: host numpy arrays, or torch tensors on a
device (bound by pointer), so that caches need not cross to the host every step."""

from __future__ import annotations

import numpy as np

from mllama_export.errors import MllamaExportError


class NumpyStore:
    """Host memory; what plain `session.run` backends take and return."""

    device = "cpu"

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype):
        return np.zeros(shape, dtype)

    def put(self, array):
        return np.ascontiguousarray(array)

    def host(self, array) -> np.ndarray:
        return np.asarray(array)


class TorchStore:
    """torch tensors on one device: the CUDA provider keeps caches on the GPU this way, and
    on the CPU the same code binds buffers by pointer instead of copying them per call."""

    def __init__(self, device: str = "cpu"):
        import torch

        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise MllamaExportError(
                "--device cuda keeps the caches on the GPU through PyTorch, and this PyTorch "
                f"has no CUDA ({'a CPU-only build' if torch.version.cuda is None else 'no device'}); "
                "install a CUDA build of torch, or use --device cpu"
            )
        self.torch, self.device = torch, torch.device(device)

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype):
        return self.torch.zeros(shape, dtype=self.torch_dtype(dtype), device=self.device)

    def put(self, array):
        if isinstance(array, self.torch.Tensor):
            return array.to(self.device).contiguous()
        array = np.ascontiguousarray(array)
        if array.dtype.name == "bfloat16":  # ml_dtypes: torch reads the bits
            return (
                self.torch.from_numpy(array.view(np.int16))
                .view(self.torch.bfloat16)
                .to(self.device)
            )
        return self.torch.from_numpy(array).to(self.device)

    def host(self, array) -> np.ndarray:
        if not isinstance(array, self.torch.Tensor):
            return np.asarray(array)
        array = array.detach().cpu()
        if array.dtype == self.torch.bfloat16:
            import ml_dtypes

            return array.view(self.torch.int16).numpy().view(ml_dtypes.bfloat16)
        return array.numpy()

    def torch_dtype(self, dtype: np.dtype):
        name = np.dtype(dtype).name
        return {
            "float32": self.torch.float32,
            "float16": self.torch.float16,
            "bfloat16": self.torch.bfloat16,
            "int64": self.torch.int64,
            "int32": self.torch.int32,
        }[name]
