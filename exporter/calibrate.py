"""FP8 calibration: the largest input magnitude each quantized Linear sees on a calibration set.

The calibration set runs through our PyTorch graphs in float32, chained by the same Runner
code as the artifacts (vision once per image set, prefill, then greedy decode steps), with a
forward pre-hook on every Linear to be quantized recording max |input| (per tensor). The
activation scale is then amax / 448 (graphs/quant.py).

:func:`calibrate_streamed` (what `build` runs) never holds the model: every case runs at once,
layer by layer, each layer read from the memory-mapped checkpoint and dropped
(exporter/layerwise.py), and the scales are those of :func:`calibrate` on the whole model,
bit for bit (tests/test_fp8_streamed.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.model import MllamaModel
from mllama_export.graphs.progress import bar
from mllama_export.graphs.weights import Checkpoint

from .layerwise import Job, LayerMajor, LazyModel

CALIBRATION_STEPS = 8  # decode steps per case, as the accuracy gate's default


def calibrate(
    model: MllamaModel,
    names: Sequence[str],
    cases: Sequence,
    limits: Limits,
    steps: int = CALIBRATION_STEPS,
) -> dict[str, float]:
    """{layer name: max |input|} over every call of each named Linear while ``cases``
    (``engines.evalset.EvalCase``: prompts and preprocessed images) are generated greedily
    for ``steps`` + 1 tokens, case after case, on ``model`` (in memory, float32)."""
    runner = Runner.from_model(model, limits)
    with _recording(model, names, cases) as amax, torch.inference_mode():
        for case in bar(cases, len(cases), "calibrating FP8 scales", "cases"):
            _generate(runner, case, steps)
    return amax


def calibrate_streamed(
    checkpoint: Checkpoint,
    semantics: str,
    names: Sequence[str],
    cases: Sequence,
    limits: Limits,
    steps: int = CALIBRATION_STEPS,
) -> dict[str, float]:
    """:func:`calibrate` without the model in memory: the float32 model of ``checkpoint``
    layer by layer, every case at once (exporter/layerwise.py). Same scales, bit for bit."""
    lazy = LazyModel(checkpoint, semantics)
    runner = lazy.runner(limits)
    jobs = [Job(lambda case=case: _generate(runner, case, steps)) for case in cases]
    with _recording(lazy.model, names, cases) as amax:
        LayerMajor(lazy).run(jobs)
    return amax


def _generate(runner: Runner, case, steps: int) -> None:
    try:
        runner.generate_ids(case.prompts, case.images, steps + 1, stop_tokens=set())
    except MllamaExportError as err:
        raise MllamaExportError(f"calibration case {case.name!r}: {err}") from err


@contextmanager
def _recording(model: nn.Module, names: Sequence[str], cases: Sequence) -> Iterator[dict]:
    """Yields {name: max |input| so far}, filled by pre-hooks on the named Linears; checks
    on the way out that every layer ran and saw finite inputs only."""
    if not cases:
        raise MllamaExportError("FP8 calibration needs at least one calibration case")
    amax = dict.fromkeys(names, 0.0)
    seen = dict.fromkeys(names, 0)

    def hook(name):
        def record(module, args):
            x = args[0]
            if x.numel():
                amax[name] = max(amax[name], float(x.detach().abs().max()))
                seen[name] += 1

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield amax
    finally:
        for handle in handles:
            handle.remove()
    _check(amax, seen)


def _check(amax: dict[str, float], seen: dict[str, int]) -> None:
    unused = [n for n, count in seen.items() if not count]
    if unused:
        raise MllamaExportError(
            f"FP8 calibration never ran {', '.join(unused[:3])}"
            + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
            + "; the calibration set needs images (the cross-attention K/V and vision layers "
            "run only on images)"
        )
    bad = [n for n, v in amax.items() if not torch.isfinite(torch.tensor(v))]
    if bad:
        raise MllamaExportError(f"FP8 calibration saw non-finite inputs in {', '.join(bad)}")
