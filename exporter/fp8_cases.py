"""The inputs of Mllama's FP8 check (exporter/fp8_check.py checks the numbers on them): what
real prompts produce, left-padded batches, images and the KV cache of a real prefill, generated
greedily by the PyTorch model through the runner."""

from __future__ import annotations

import numpy as np
import torch

from mllama_export.engines.backend import TorchBackend
from mllama_export.engines.evalset import _CaseMaker
from mllama_export.engines.runner import Runner
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.model import GRAPH_MODULES

from .fp8_common import Recorder


class _RowByRow:
    """The vision backend run one batch row at a time, outputs joined on the batch axis."""

    def __init__(self, backend):
        self.backend, self.inputs, self.outputs = backend, backend.inputs, backend.outputs
        self.name = "row-by-row"

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [
            self.backend.infer({k: v[b : b + 1] for k, v in feed.items()})
            for b in range(len(feed["aspect_ratio_ids"]))
        ]
        return {s.name: np.concatenate([r[s.name] for r in rows], axis=1) for s in self.outputs}


def check_cases(config: MllamaConfig, limits: Limits) -> list:
    """Two prompts' worth of real inputs, at sizes unlike the traced ones (batch 2, 2 images):
    one prompt with an image (batch 1), and a left-padded batch of up to 3 prompts (a text-only
    one, one with text before its image, one with the image first) whose images go to the
    vision graph one row at a time (11B's tiles make a batch of images heavy on a CPU)."""
    longest = max(4, min(20, limits.max_seq_len - 4))
    maker = _CaseMaker(config, seed=7, longest=longest)
    one_tile = next(
        r
        for r in range(1, config.vision.max_aspect_ratio_id + 1)
        if np.prod(config.vision.supported_aspect_ratios[r - 1]) == 1
    )
    rows = [(5, []), (11, [(4, one_tile)]), (8, [(1, one_tile)])][: limits.max_batch]
    return [maker.case("check-image", [(9, [(1, one_tile)])]), maker.case("check-padded", rows)]


def check_feeds(model: torch.nn.Module, limits: Limits, dtype: torch.dtype) -> dict[str, list]:
    """{graph: [feeds]} of the check cases generated greedily by ``model`` (PyTorch, the
    build's precision): the vision graph's of the one-image case, every prefill, and the
    first two decode steps of each case."""
    io = str(dtype).removeprefix("torch.")
    graphs = [cls(model) for cls in GRAPH_MODULES.values()]
    rec = [Recorder(TorchBackend(g)) for g in graphs]
    runner = Runner(model.config, dict(zip(GRAPH_MODULES, rec, strict=True)), limits, io)
    feeds = {name: [] for name in GRAPH_MODULES}
    for i, case in enumerate(check_cases(model.config, limits)):
        before = [len(r.feeds) for r in rec]
        # the padded batch's vision K/V are only an input of the text graphs' check
        runner.vision = rec[0] if i == 0 else _RowByRow(rec[0].backend)
        runner.generate_ids(case.prompts, case.images, 3, stop_tokens=set())
        vision, prefill, decode = (r.feeds[b:] for r, b in zip(rec, before, strict=True))
        feeds["vision"] += vision if i == 0 else []
        feeds["prefill"] += prefill
        feeds["decode"] += decode[:2]
    return feeds
