"""Checkpoint tensors <-> our module tree, through one declarative table, loaded strictly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mllama_export.errors import MllamaExportError

from .config import MllamaConfig
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
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def iter_checkpoint(folder: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(checkpoint name, our name, tensor) for every tensor, one shard open at a time, mmapped."""
    by_file: dict[Path, list[str]] = {}
    for name, file in shard_files(folder).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise MllamaExportError(
                            f"the index puts {name} in {file.name}, which lacks it"
                        )
                    yield name, our_name(name), f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise MllamaExportError(
                f"{file} is truncated or corrupt ({err}); expected a complete safetensors "
                "file: re-download or re-write it"
            ) from err


def load_model(
    folder: str | Path, semantics: str = "meta", dtype: torch.dtype = torch.float32
) -> MllamaModel:
    """Builds the model from a checkpoint folder: every tensor used, every shape checked."""
    folder = Path(folder)
    check_folder(folder)
    config = MllamaConfig.from_hf_config(folder)
    with torch.device("meta"):
        model = MllamaModel(config, semantics)
    expected = {n: p.shape for n, p in model.state_dict().items()}
    loaded: dict[str, torch.Tensor] = {}
    unknown = []
    for theirs, ours, tensor in iter_checkpoint(folder):
        if ours not in expected:
            unknown.append(theirs)
            continue
        _check_tensor(theirs, tensor, expected[ours])
        loaded[ours] = tensor.to(dtype)
    missing = sorted(checkpoint_name(n) for n in expected.keys() - loaded.keys())
    if unknown or missing:
        raise MllamaExportError(
            f"checkpoint {folder} does not match its config: "
            f"{len(missing)} tensors missing {missing[:5]}, {len(unknown)} unexpected {unknown[:5]}; "
            "expected exactly the tensors of the Llama 3.2 Vision model its config.json describes"
        )
    model.load_state_dict(loaded, assign=True, strict=True)
    _materialize_buffers(model, config)
    return model.eval()


def _check_tensor(name: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tensor.shape != shape:
        raise MllamaExportError(
            f"tensor {name} has shape {list(tensor.shape)}; the config implies {list(shape)}"
        )
    if tensor.dtype not in FLOAT_DTYPES:
        raise MllamaExportError(
            f"tensor {name} is {tensor.dtype}; expected float32, float16 or bfloat16"
        )


def _materialize_buffers(model: MllamaModel, config: MllamaConfig) -> None:
    # Non-persistent buffers (the rope frequencies) are not in the checkpoint; rebuild them.
    from .layers import rope_inv_freq

    model.text.rotary.inv_freq = rope_inv_freq(config.text.rope, config.text.head_dim)
