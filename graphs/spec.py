"""What an exported graph is, for any family: its tensors (names, dtypes, named dims) and
where its weights go. Each family's contract (Mllama's: graphs/contract.py) lists its graphs as
`GraphSpec`s; nothing here knows which graphs exist."""

from __future__ import annotations

import inspect
from collections.abc import Collection
from dataclasses import dataclass

from mllama_export.errors import MllamaExportError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64", "float32" or "model" (the graph's precision)
    dims: tuple[str, ...]
    doc: str

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] for d in self.dims)

    def dynamic_axes(self, dynamic: Collection[str]) -> dict[int, str]:
        """Axis -> dim name, for the dims that are chosen per call (the family's dynamic dims)."""
        return {i: d for i, d in enumerate(self.dims) if d in dynamic}


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: the names its module's forward takes and returns, in order, and
    where its weights go. A family's graph modules take their INPUTS/OUTPUTS from its
    registry of these, and every list of the graphs (export, manifest, artifacts, profiles,
    engines) is read off that registry (graphs/family.py `Family.graphs`)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    data_file: str  # its external weights, beside it in onnx/
    # the graph whose engine also serves this one with `build --text-engine shared`
    shared_engine: str | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    @property
    def dims(self) -> tuple[str, ...]:
        """The named dims of its inputs and outputs, in order of first use."""
        return tuple(dict.fromkeys(d for s in (*self.inputs, *self.outputs) for d in s.dims))

    @property
    def shares_text_weights(self) -> bool:
        return self.data_file == TEXT_DATA_FILE


# a family's prompt and step graphs hold the same text weights: one copy on disk, same offsets
TEXT_DATA_FILE = "text.onnx.data"


def check_forward(module: object, inputs: tuple[TensorSpec, ...]) -> None:
    """A graph module's forward must take exactly its contract's inputs, in order: export
    names the ONNX inputs by position, so a forward with two parameters swapped would
    otherwise export, run and check as a graph whose inputs mean each other's."""
    forward = type(module).forward
    params = list(inspect.signature(forward).parameters)[1:]
    expected = [s.name for s in inputs]
    if params != expected:
        raise MllamaExportError(
            f"{type(module).__name__}.forward takes {params}; its contract declares the "
            f"inputs {expected}, in that order"
        )
