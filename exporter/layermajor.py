"""The layer-major scheduler: jobs over a lazily loaded model, one unit (layer) in memory at a time.

Family-independent (each family's "layerwise" part holds its LazyModel: which modules are
units, which methods the graphs call besides forward). A lazy model gives the scheduler
``model`` (its module tree, the units' tensors on the meta device while unloaded),
``load(unit)``, ``free(unit)``, ``unit_of(name)`` and a ``scheduler`` attribute; it calls
``scheduler.graph_call(graph)`` as each graph starts (``graph``: the contract's name, the
image graph is "vision") and ``scheduler.arrive(unit)`` as a job enters a unit.

:class:`LayerMajor` runs *jobs* (callables that run the graphs the ordinary way, such as
``Runner.generate_ids`` on one case) each in a thread of its own, strictly one at a time: a
job parks when it reaches a unit, and a unit is loaded once every unfinished job waits for it
or for a later one. So each graph call reads each unit once for all the jobs, and what runs
is the graph code itself, op for op, on the same shapes: the results equal those of the
whole model in memory, bit for bit.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mllama_export.engines.backend import TorchBackend
from mllama_export.engines.runner import Runner
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.progress import info

VISION_GRAPH = "vision"  # the graph a LayerMajor phase runs before its prefill


def read_float(checkpoint: Any, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One checkpoint tensor in ``dtype``, filled block by block (no second full copy)."""
    stored = checkpoint.tensors[name]
    whole = torch.empty(stored.shape, dtype=dtype)
    flat, at = whole.view(-1), 0
    for block in checkpoint.blocks(name, dtype):
        flat[at : at + block.numel()] = block.reshape(-1)
        at += block.numel()
        del block
    return whole


def arriving(method: Callable, arrive: Callable[[], None]) -> Callable:
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        arrive()
        return method(*args, **kwargs)

    return wrapper


class LazyBase:
    """A family's model of ``checkpoint`` (``model``: built on the meta device) whose units
    (``units``: module paths, in the order every graph runs them) are read on demand, in
    ``dtype``; every other checkpoint tensor is read once (resident), and ``buffers``
    (non-persistent ones a checkpoint lacks, such as rope frequencies) are set as given.
    ``graph_modules``: the family's {graph name: module class}. A family's LazyModel builds
    on this; ``entries()`` names the methods its graphs call on a unit other than forward."""

    def __init__(
        self,
        checkpoint: Any,
        model: nn.Module,
        units: Sequence[str],
        buffers: Mapping[str, torch.Tensor],
        graph_modules: Mapping[str, type[nn.Module]],
        dtype: torch.dtype = torch.float32,
    ):
        self.checkpoint, self.config, self.dtype = checkpoint, checkpoint.config, dtype
        self.model, self.units = model.eval(), list(units)
        self._prefixes = [p + "." for p in self.units]
        self._unit_of: dict[str, int | None] = {}
        resident = {n: read_float(checkpoint, n, dtype) for n in self._resident()}
        self.model.load_state_dict(resident, assign=True, strict=False)
        for name, tensor in buffers.items():
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, tensor)
        self.scheduler: LayerMajor | None = None
        self._hook_units()
        self.graph_names = tuple(graph_modules)
        self.graphs = self._graphs(graph_modules)

    def entries(self) -> list[tuple[object, str, str]]:
        """(owner, method name, unit path) of each method a graph calls on a unit's modules
        other than their forward (a decoder layer's prefill and step)."""
        return []

    def unit_of(self, name: str) -> int | None:
        """The unit holding the tensor or module ``name``; None: resident."""
        if name not in self._unit_of:
            dotted = name + "."
            found = (i for i, p in enumerate(self._prefixes) if dotted.startswith(p))
            self._unit_of[name] = next(found, None)
        return self._unit_of[name]

    def _resident(self) -> list[str]:
        return [n for n in self.checkpoint.tensors if self.unit_of(n) is None]

    def load(self, unit: int) -> None:
        prefix = self.units[unit]
        module = self.model.get_submodule(prefix)
        state = {
            name: read_float(self.checkpoint, f"{prefix}.{name}", self.dtype)
            for name in module.state_dict()
        }
        module.load_state_dict(state, assign=True, strict=True)

    def free(self, unit: int) -> None:
        self.model.get_submodule(self.units[unit]).to_empty(device="meta")

    def runner(self, limits: Limits) -> Runner:
        """A Runner over this model's graphs (run it inside a LayerMajor job only)."""
        backends = {n: TorchBackend(g) for n, g in zip(self.graph_names, self.graphs, strict=True)}
        return Runner(self.config, backends, limits, str(self.dtype).removeprefix("torch."))

    def _graphs(self, graph_modules: Mapping[str, type[nn.Module]]) -> tuple[nn.Module, ...]:
        graphs = tuple(cls(self.model) for cls in graph_modules.values())
        for kind, graph in zip(graph_modules, graphs, strict=True):
            graph.register_forward_pre_hook(lambda m, args, kind=kind: self._graph_call(kind))
        return graphs

    def _graph_call(self, kind: str) -> None:
        if self.scheduler is not None:
            self.scheduler.graph_call(kind)

    def _arrive(self, unit: int) -> None:
        if self.scheduler is None:
            raise RuntimeError("a LazyModel runs inside LayerMajor.run only")
        self.scheduler.arrive(unit)

    def _hook_units(self) -> None:
        for i, prefix in enumerate(self.units):
            module = self.model.get_submodule(prefix)
            module.register_forward_pre_hook(lambda m, args, i=i: self._arrive(i))
        for owner, method, prefix in self.entries():
            unit = self.units.index(prefix)
            wrapped = arriving(getattr(owner, method), functools.partial(self._arrive, unit))
            setattr(owner, method, wrapped)


def _describe(phase: int) -> str:
    if phase % 2 == 0:
        return "vision graph, layer by layer"
    call = (phase - 1) // 2  # 0: the prefill, then the decode steps
    return "prefill, layer by layer" if call == 0 else f"decode step {call - 1}, layer by layer"


class _Aborted(BaseException):
    """Raised in a parked job when another job failed."""


@dataclass(eq=False)
class Job:
    """One callable run by LayerMajor; ``overrides`` {module name: factory} replace those
    modules' forward (factory(module) -> forward) only while this job runs. A factory's
    result is kept while its unit stays loaded: share one factory object across jobs."""

    fn: Callable[[], object]
    overrides: Mapping[str, Callable[[nn.Module], Callable]] = field(default_factory=dict)
    key: tuple[int, int] = (-1, -1)  # (phase, unit) it waits at; (-1, -1): not started
    phase: int = 0
    text_calls: int = 0
    done: bool = False
    result: object = None
    error: BaseException | None = None
    go: threading.Event = field(default_factory=threading.Event)


class LayerMajor:
    """Runs jobs over a LazyModel one unit at a time (see the module docstring)."""

    def __init__(self, lazy: LazyBase):
        self.lazy = lazy
        self._local = threading.local()
        self._parked = threading.Event()
        self._abort = False
        self._loaded: int | None = None
        # override forwards made on loaded modules: {(name, id(factory)): (unit, forward)}
        self._made: dict[tuple[str, int], tuple[int | None, Callable]] = {}
        self.loads = 0  # units read, for the tests and the progress line

    def run(self, jobs: Sequence[Job]) -> list:
        """Runs every job to its end; returns their results in order. The first error any
        job raises is raised here, after every other job has been stopped."""
        self.lazy.scheduler, self._abort = self, False
        threads = [threading.Thread(target=self._body, args=(j,), daemon=True) for j in jobs]
        for thread in threads:
            thread.start()
        try:
            self._loop(list(jobs))
        finally:
            self._stop(jobs)
            for thread in threads:
                thread.join()
            if self._loaded is not None:
                self.lazy.free(self._loaded)
                self._loaded = None
            self._made.clear()
            self.lazy.scheduler = None
        return [job.result for job in jobs]

    def _loop(self, jobs: list[Job]) -> None:
        phase = None
        while pending := [j for j in jobs if not j.done]:
            key = min(j.key for j in pending)
            if key[1] >= 0 and key[1] != self._loaded:
                if self._loaded is not None:
                    self.lazy.free(self._loaded)
                self._loaded = None
                self._made = {k: v for k, v in self._made.items() if v[0] is None}
                self.lazy.load(key[1])
                self._loaded, self.loads = key[1], self.loads + 1
                if key[0] != phase:
                    info(_describe(key[0]))
                phase = key[0]
            for job in [j for j in pending if j.key == key]:
                self._resume(job)
                if job.error is not None:
                    raise job.error

    def _resume(self, job: Job) -> None:
        applied = self._apply(job)
        try:
            self._parked.clear()
            job.go.set()
            self._parked.wait()
        finally:
            for module in applied:
                del module.forward

    def _apply(self, job: Job) -> list[nn.Module]:
        applied = []
        for name, make in job.overrides.items():
            unit = self.lazy.unit_of(name)
            if unit is None or unit == self._loaded:
                module = self.lazy.model.get_submodule(name)
                key = (name, id(make))
                if key not in self._made:
                    self._made[key] = (unit, make(module))
                module.forward = self._made[key][1]
                applied.append(module)
        return applied

    def _stop(self, jobs: Sequence[Job]) -> None:
        self._abort = True
        for job in jobs:
            if not job.done:
                self._parked.clear()
                job.go.set()
                self._parked.wait()

    def _body(self, job: Job) -> None:
        self._local.job = job
        job.go.wait()
        job.go.clear()
        try:
            if self._abort:
                raise _Aborted
            with torch.inference_mode():
                job.result = job.fn()
        except _Aborted:
            pass
        except BaseException as err:  # handed to the main thread
            job.error = err
        job.done = True
        self._parked.set()

    def graph_call(self, kind: str) -> None:
        """A graph starts: the vision graph comes before its prefill, every text graph
        call (prefill, each decode step) is a phase of its own."""
        job = self._local.job
        if kind == VISION_GRAPH:
            job.phase = 2 * job.text_calls
        else:
            job.text_calls += 1
            job.phase = 2 * job.text_calls - 1

    def arrive(self, unit: int) -> None:
        """Called by a job as it enters ``unit``: parks it unless that is the loaded unit of
        the key it was resumed at."""
        job = self._local.job
        key = (job.phase, unit)
        if key == job.key and unit == self._loaded:
            return
        job.key = key
        job.go.clear()
        self._parked.set()
        job.go.wait()
        job.go.clear()
        if self._abort:
            raise _Aborted
