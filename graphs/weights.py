"""Checkpoint tensors <-> our module tree, through one declarative table, loaded strictly."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mllama_export.errors import MllamaExportError

from .config import MllamaConfig
from .layers import rope_inv_freq
from .model import MllamaModel

# (checkpoint prefix, our prefix), first match wins. The first four rows are the names that the
# published checkpoints (and transformers' save_pretrained) use; the last four are the in-memory
# names of transformers 5.x, found in files written straight from its state_dict().
WEIGHT_TABLE: tuple[tuple[str, str], ...] = (
    ("language_model.lm_head.", "text.lm_head."),
    ("language_model.model.", "text."),
    ("vision_model.", "vision."),
    ("multi_modal_projector.", "projector."),
    ("lm_head.", "text.lm_head."),
    ("model.language_model.", "text."),
    ("model.vision_model.", "vision."),
    ("model.multi_modal_projector.", "projector."),
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def our_name(checkpoint_name: str) -> str | None:
    for theirs, ours in WEIGHT_TABLE:
        if checkpoint_name.startswith(theirs):
            return ours + checkpoint_name[len(theirs) :]
    return None


def checkpoint_name(name: str) -> str:
    """The name a published checkpoint gives one of our parameters."""
    for theirs, ours in WEIGHT_TABLE[:4]:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(name)


def shard_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    check_folder(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MllamaExportError(
                f"cannot read {index}: {type(err).__name__}: {err}; expected a JSON object with "
                "a 'weight_map' of tensor name -> shard file"
            ) from err
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) for f in weight_map.values()
        ):
            raise MllamaExportError(
                f"{index}: 'weight_map' is {type(weight_map).__name__}; expected an object of "
                "tensor name -> shard file name"
            )
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            present = sorted(p.name for p in folder.glob("*.safetensors"))
            raise MllamaExportError(
                f"{index} names shards that do not exist: {missing}; safetensors files "
                f"present: {present or 'none'}"
            )
        return {name: folder / f for name, f in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        return {name: single for name in _keys(single)}
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise MllamaExportError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); mllama-export never "
            "unpickles (loading a pickle runs arbitrary code). Convert them to safetensors first."
        )
    raise MllamaExportError(
        f"{folder} has neither model.safetensors nor model.safetensors.index.json; "
        f"files present: {', '.join(sorted(p.name for p in folder.iterdir())) or 'none'}"
    )


def check_folder(folder: Path) -> None:
    if folder.is_file():
        raise MllamaExportError(
            f"{folder} is a file; expected a checkpoint folder (config.json and "
            "model.safetensors or model.safetensors.index.json with its shards)"
        )
    if not folder.is_dir():
        raise MllamaExportError(
            f"checkpoint folder {folder} does not exist; expected a folder with config.json and "
            "safetensors weights"
        )


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise MllamaExportError(
            f"{file} is not a readable safetensors file ({err}); expected a complete "
            "safetensors file: re-download or re-write it"
        ) from err


# safetensors dtype names -> torch; anything else (integers, FP8) is not a Llama checkpoint
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# what one read of the streaming export holds: blocks of rows, each opened and mapped anew
BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class StoredTensor:
    name: str  # as the checkpoint names it
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, F16, BF16, ...


class Checkpoint:
    """A checkpoint folder checked against a config from the safetensors headers alone (every
    tensor used, every shape and dtype right), then read one tensor at a time."""

    def __init__(self, folder: str | Path, config: MllamaConfig):
        self.folder, self.config = Path(folder), config
        with torch.device("meta"):
            expected = {n: tuple(t.shape) for n, t in MllamaModel(config).state_dict().items()}
        stored = _headers(self.folder)
        unknown = [s.name for ours, s in stored.items() if ours not in expected]
        missing = sorted(checkpoint_name(n) for n in expected.keys() - stored.keys())
        if unknown or missing:
            raise MllamaExportError(
                f"checkpoint {self.folder} does not match its config: "
                f"{len(missing)} tensors missing {missing[:5]}, {len(unknown)} unexpected "
                f"{unknown[:5]}; expected exactly the tensors of the Llama 3.2 Vision model "
                "its config.json describes"
            )
        self.tensors = {n: stored[n] for n in sorted(expected)}
        for ours, shape in expected.items():
            _check_tensor(self.tensors[ours], shape)

    def read(self, name: str) -> torch.Tensor:
        """One tensor by our name, as stored. Each read opens its file anew, so that the
        memory map (and the pages it touched) goes away with the tensor."""
        stored = self.tensors[name]
        try:
            with safe_open(stored.file, framework="pt") as f:
                return f.get_tensor(stored.name)
        except (SafetensorError, OSError) as err:
            raise _corrupt(stored.file, err) from err

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of one tensor by our name, as stored."""
        return _rows(self.tensors[name], start, stop)

    def blocks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """One tensor by our name as consecutive blocks of rows, each cast to ``dtype``: what
        the streaming export writes, never more than a block of it in memory at once."""
        stored = self.tensors[name]
        row_bytes = math.prod(stored.shape[1:]) * SAFETENSORS_DTYPES[stored.dtype].itemsize
        rows = stored.shape[0] if stored.shape else 1
        step = max(1, BLOCK_BYTES // max(row_bytes, 1))
        for start in range(0, rows, step):
            # no local keeps a block across the yield: the next is read after it is dropped
            yield _rows(stored, start, start + step).to(dtype)


def _headers(folder: Path) -> dict[str, StoredTensor]:
    """Our name -> where and what each checkpoint tensor is; names outside the weight table
    are kept under their own name, so that the strict check reports them."""
    by_file: dict[Path, list[str]] = {}
    for name, file in shard_files(folder).items():
        by_file.setdefault(file, []).append(name)
    found = {}
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise MllamaExportError(
                            f"the index puts {name} in {file.name}, which lacks it"
                        )
                    part = f.get_slice(name)
                    stored = StoredTensor(name, file, tuple(part.get_shape()), part.get_dtype())
                    found[our_name(name) or f"?{name}"] = stored
        except (SafetensorError, OSError) as err:
            raise _corrupt(file, err) from err
    return found


def _rows(stored: StoredTensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a stored tensor (all of a 0-d one), its file mapped for this read
    only, so that the pages it touched leave the process with the rows."""
    try:
        with safe_open(stored.file, framework="pt") as f:
            if not stored.shape:
                return f.get_tensor(stored.name)
            return f.get_slice(stored.name)[start:stop]
    except (SafetensorError, OSError) as err:
        raise _corrupt(stored.file, err) from err


def _corrupt(file: Path, err: Exception) -> MllamaExportError:
    return MllamaExportError(
        f"{file} is truncated or corrupt ({err}); expected a complete safetensors "
        "file: re-download or re-write it"
    )


def load_model(
    folder: str | Path,
    semantics: str = "meta",
    dtype: torch.dtype = torch.float32,
) -> MllamaModel:
    """Builds the model from a checkpoint folder: every tensor used, every shape checked."""
    folder = Path(folder)
    check_folder(folder)
    checkpoint = Checkpoint(folder, MllamaConfig.from_hf_config(folder))
    with torch.device("meta"):
        model = MllamaModel(checkpoint.config, semantics)
    state = {name: checkpoint.read(name).to(dtype) for name in checkpoint.tensors}
    model.load_state_dict(state, assign=True, strict=True)
    _materialize_buffers(model, checkpoint.config)
    return model.eval()


def _check_tensor(stored: StoredTensor, shape: tuple[int, ...]) -> None:
    if stored.shape != shape:
        raise MllamaExportError(
            f"tensor {stored.name} has shape {list(stored.shape)}; the config implies {list(shape)}"
        )
    if stored.dtype not in SAFETENSORS_DTYPES:
        raise MllamaExportError(
            f"tensor {stored.name} is {stored.dtype}; expected float32, float16 or bfloat16 "
            "(F32, F16 or BF16)"
        )


def computed_buffers(config: MllamaConfig) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (the rope frequencies): not in the checkpoint, rebuilt."""
    return {"text.rotary.inv_freq": rope_inv_freq(config.text.rope, config.text.head_dim)}


def _materialize_buffers(model: MllamaModel, config: MllamaConfig) -> None:
    for name, tensor in computed_buffers(config).items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, tensor)
