"""Where a backend keeps tensors between calls: host numpy arrays, or torch tensors on a
device (bound by pointer), so that caches need not cross to the host every step."""

from __future__ import annotations

import numpy as np

from mllama_export.errors import MllamaExportError


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name (torch's and numpy's names agree)."""
    if name == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16 of its own

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def torch_dtype(name: str):
    """The torch dtype of a dtype name (a numpy dtype's name, or float8_e4m3fn); None when this
    torch has no such dtype."""
    import torch

    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def to_torch(array: np.ndarray):
    """A host array as a CPU tensor sharing its memory; numpy's bfloat16 (ml_dtypes) is not a
    type torch knows, so torch reads its bits."""
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor) -> np.ndarray:
    """A tensor on the host as numpy (bfloat16 through its bits, as ml_dtypes' bfloat16);
    a tensor on a device is copied to the host first, on its current stream."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return tensor.numpy()


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
        dtype = torch_dtype(np.dtype(dtype).name)
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def put(self, array):
        if isinstance(array, self.torch.Tensor):
            return array.to(self.device).contiguous()
        return to_torch(array).to(self.device)

    def host(self, array) -> np.ndarray:
        if not isinstance(array, self.torch.Tensor):
            return np.asarray(array)
        return to_numpy(array)
