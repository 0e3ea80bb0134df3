"""Any family's checkpoint: its tensors <-> our module tree, through the family's declarative
name table, checked strictly from the safetensors headers and read one tensor at a time.

A family gets strict reading, loading (`load_model`) and a synthetic writer
(graphs/synthetic.py) by declaring two parts: "model" (the nn.Module holding every weight,
built from a config: `model(config, **model_options)`; its state_dict on the meta device is
what a checkpoint must hold) and "checkpoint_format" (a :class:`CheckpointFormat`: the name
table, the buffers a checkpoint does not carry, the files written beside the weights), and
pointing its "checkpoint", "load_model" and "synth" parts at `Checkpoint`, `load_model` and
graphs/synthetic.py's `write_checkpoint` (or at thin bindings of them, as Mllama's
graphs/weights.py does to keep its own config reader's messages). The parts as generic code
calls them: ``checkpoint(folder, config)`` (``.folder``, ``.config``, ``.tensors``, ``.read``,
``.rows``, ``.blocks``), ``load_model(folder, dtype=..., **model_options)`` and
``synth(config, out, seed, shards, dtype, max_shard_bytes=...)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mllama_export.errors import MllamaExportError

from .family import Family, family_of, load_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _no_buffers(config: Any) -> dict[str, torch.Tensor]:
    return {}


def _no_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    return {}


@dataclass(frozen=True)
class CheckpointFormat:
    """A family's checkpoint layout (its "checkpoint_format" part).

    ``table``: (checkpoint prefix, our prefix) rows, first match wins; the first ``published``
    rows are the names published checkpoints use (the synthetic writer writes those), the rest
    other spellings that are read as well. ``model``: how messages name the model ("the
    Llama 3.2 Vision model"). ``buffers(config)``: our name -> tensor of the non-persistent
    buffers a checkpoint does not hold (rope frequencies), rebuilt at load. ``side_files(config,
    folder)``: writes what a synthetic checkpoint carries besides config.json and the weights.
    ``describe(config)``: its geometry in words, for `synth`'s summary ("2 text layers, ...").
    ``unused(config)``: our name -> shape of the tensors a published checkpoint carries that no
    output reads (LLaVA: CLIP's post-layernorm, tower layers past the feature layer): accepted
    with their shapes checked, never loaded; synthetic checkpoints write them too.
    ``optional(config)``: the same for tensors a checkpoint may or may not carry (a tied head
    saved twice): accepted and checked, never written. ``check_names(folder, names)``: refuses
    a layout of the family's checkpoint names that the table cannot read (LLaVA: the original
    repository's), before the strict check says "unexpected".
    """

    table: tuple[tuple[str, str], ...]
    published: int
    model: str
    buffers: Callable[[Any], dict[str, torch.Tensor]] = _no_buffers
    side_files: Callable[[Any, Path], None] | None = None
    describe: Callable[[Any], str] | None = None
    unused: Callable[[Any], dict[str, tuple[int, ...]]] = _no_shapes
    optional: Callable[[Any], dict[str, tuple[int, ...]]] = _no_shapes
    check_names: Callable[[Path, list[str]], None] | None = None

    def our_name(self, checkpoint_name: str) -> str | None:
        for theirs, ours in self.table:
            if checkpoint_name.startswith(theirs):
                return ours + checkpoint_name[len(theirs) :]
        return None

    def checkpoint_name(self, name: str) -> str:
        """The name a published checkpoint gives one of our tensors."""
        for theirs, ours in self.table[: self.published]:
            if name.startswith(ours):
                return theirs + name[len(ours) :]
        raise KeyError(name)


def checkpoint_format(family: Family) -> CheckpointFormat:
    return family.part("checkpoint_format")


def expected_shapes(config: Any, family: Family | None = None) -> dict[str, tuple[int, ...]]:
    """Our name -> shape of every tensor a checkpoint of ``config`` holds: the family's model
    built on the meta device (no memory), its state_dict."""
    family = family or family_of(config)
    with torch.device("meta"):
        model = family.part("model")(config)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


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


# safetensors dtype names -> torch; anything else (integers, FP8) is not a float checkpoint
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
    tensor used, every shape and dtype right), then read one tensor at a time. The family is
    the config's (``family`` overrides it)."""

    def __init__(self, folder: str | Path, config: Any, family: Family | None = None):
        self.folder, self.config = Path(folder), config
        self.family = family or family_of(config)
        names = checkpoint_format(self.family)
        expected = expected_shapes(config, self.family)
        known = {**names.optional(config), **names.unused(config)}
        stored, twice = _headers(self.folder, names)
        allowed = expected.keys() | known.keys()
        unknown = [s.name for ours, s in stored.items() if ours not in allowed]
        missing = sorted(names.checkpoint_name(n) for n in expected.keys() - stored.keys())
        if unknown or missing or twice:
            stored_twice = f", {len(twice)} stored twice under two spellings {twice[:3]}"
            raise MllamaExportError(
                f"checkpoint {self.folder} does not match its config: "
                f"{len(missing)} tensors missing {missing[:5]}, {len(unknown)} unexpected "
                f"{unknown[:5]}{stored_twice if twice else ''}; expected exactly the tensors "
                f"of {names.model} its config.json describes"
            )
        self.tensors = {n: stored[n] for n in sorted(expected)}
        for ours, shape in {**known, **expected}.items():
            if ours in stored:
                _check_tensor(stored[ours], shape)

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


def _headers(folder: Path, layout: CheckpointFormat) -> tuple[dict[str, StoredTensor], list[str]]:
    """Our name -> where and what each checkpoint tensor is, and the tensors stored twice
    under two spellings of one name; names outside the name table are kept under their own
    name, so that the strict check reports them."""
    by_file: dict[Path, list[str]] = {}
    for name, file in shard_files(folder).items():
        by_file.setdefault(file, []).append(name)
    if layout.check_names is not None:
        layout.check_names(folder, [n for names in by_file.values() for n in names])
    found: dict[str, StoredTensor] = {}
    twice = []
    for file, names in by_file.items():
        for stored in _file_headers(file, names):
            ours = layout.our_name(stored.name) or f"?{stored.name}"
            if ours in found:
                twice.append(f"{found[ours].name} and {stored.name}")
            found[ours] = stored
    return found, twice


def _file_headers(file: Path, names: list[str]) -> list[StoredTensor]:
    try:
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
            found = []
            for name in names:
                if name not in present:
                    raise MllamaExportError(f"the index puts {name} in {file.name}, which lacks it")
                part = f.get_slice(name)
                found.append(StoredTensor(name, file, tuple(part.get_shape()), part.get_dtype()))
            return found
    except (SafetensorError, OSError) as err:
        raise _corrupt(file, err) from err


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


def load_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    config: Any = None,
    family: Family | None = None,
    **model_options: Any,
) -> torch.nn.Module:
    """Builds the model from a checkpoint folder: every tensor used, every shape checked.
    ``config`` defaults to the folder's config.json (its model_type picks the family);
    ``model_options`` go to the family's model (Mllama: ``semantics``)."""
    folder = Path(folder)
    check_folder(folder)
    config = load_config(folder) if config is None else config
    family = family or family_of(config)
    checkpoint = family.part("checkpoint")(folder, config)
    with torch.device("meta"):
        model = family.part("model")(config, **model_options)
    state = {name: checkpoint.read(name).to(dtype) for name in checkpoint.tensors}
    model.load_state_dict(state, assign=True, strict=True)
    materialize_buffers(model, checkpoint_format(family).buffers(config))
    return model.eval()


def materialize_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Sets the non-persistent buffers (``buffers``: our name -> tensor) of a model loaded
    from the meta device, where they have no values."""
    for name, tensor in buffers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, tensor)
