"""The one contract every backend keeps: `infer(feed) -> outputs`, numpy in and out."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.spec import TensorSpec, check_forward


class Backend(Protocol):
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_feed(graph: str, specs: tuple[TensorSpec, ...], feed: dict[str, np.ndarray]) -> None:
    """Names and ranks of a feed against a graph's contract, before any backend sees it."""
    expected = [s.name for s in specs]
    if sorted(feed) != sorted(expected):
        raise MllamaExportError(
            f"invalid inputs for the {graph} graph: got {sorted(feed)}; "
            f"the graph takes exactly {expected}"
        )
    for spec in specs:
        if feed[spec.name].ndim != len(spec.dims):
            raise MllamaExportError(
                f"{graph} input {spec.name} has shape {list(feed[spec.name].shape)}; "
                f"expected [{', '.join(spec.dims)}]"
            )


class TorchBackend:
    """Runs one of our PyTorch graph modules: the reference every other backend is held to."""

    name = "torch"

    def __init__(self, graph):
        import torch

        self._torch = torch
        check_forward(graph, graph.INPUTS)
        self.graph = graph.eval()
        self.inputs, self.outputs = graph.INPUTS, graph.OUTPUTS
        self.label = type(graph).__name__

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.label, self.inputs, feed)
        torch = self._torch
        args = {s.name: torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in self.inputs}
        with torch.inference_mode():
            outs = self.graph(**args)
        if isinstance(outs, torch.Tensor):  # a graph of one output returns it bare
            outs = (outs,)
        return {s.name: out.numpy() for s, out in zip(self.outputs, outs, strict=True)}
