"""FP8 calibration, for every family: the largest input magnitude each quantized Linear sees.

The calibration set runs through the family's PyTorch graphs in float32, chained by the same
Runner code as the artifacts (the image graph once per image set, prefill, then greedy decode
steps), with a forward pre-hook on every Linear to be quantized recording max |input| (per
tensor). The activation scale is then amax / 448 (graphs/quant.py).

:func:`calibrate` runs a model in memory; :func:`calibrate_layerwise` runs a family's lazy
model (its "layerwise" part) layer by layer, every case at once (exporter/layermajor.py), and
gives the same scales (bit for bit with a reproducible BLAS).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.progress import bar

from .layermajor import Job, LayerMajor

CALIBRATION_STEPS = 8  # decode steps per case, as the accuracy gate's default


def calibrate(
    model: nn.Module,
    names: Sequence[str],
    cases: Sequence,
    limits: Limits,
    steps: int = CALIBRATION_STEPS,
) -> dict[str, float]:
    """{layer name: max |input|} over every call of each named Linear while ``cases`` (the
    family's evaluation cases: prompts and preprocessed images) are generated greedily for
    ``steps`` + 1 tokens, case after case, on ``model`` (in memory, float32)."""
    runner = Runner.from_model(model, limits)
    with _recording(model, names, cases) as amax, torch.inference_mode():
        for case in bar(cases, len(cases), "calibrating FP8 scales", "cases"):
            _generate(runner, case, steps)
    return amax


def calibrate_layerwise(
    lazy: Any,
    names: Sequence[str],
    cases: Sequence,
    limits: Limits,
    steps: int = CALIBRATION_STEPS,
) -> dict[str, float]:
    """:func:`calibrate` on a family's LazyModel (``lazy.model``, ``lazy.runner(limits)``):
    the model never whole in memory, every case at once. Same scales (bit for bit
    with a reproducible BLAS: tests/test_fp8_streamed.py)."""
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
            + "; the calibration set needs images (the vision layers, and every layer that "
            "reads image features, run only on images)"
        )
    bad = [n for n, v in amax.items() if not torch.isfinite(torch.tensor(v))]
    if bad:
        raise MllamaExportError(f"FP8 calibration saw non-finite inputs in {', '.join(bad)}")
