"""Our PyTorch graphs run over a checkpoint one layer at a time: the model is never whole in memory.

A :class:`LazyModel` is an MllamaModel whose small tensors are read once (float32) and whose
large ones are grouped in *units* (each vision layer, the token embedding, each text decoder
layer, lm_head): a unit is read from the memory-mapped checkpoint only while it runs, then
dropped. :class:`LayerMajor` runs *jobs* (callables that run the graphs the ordinary way, such
as ``Runner.generate_ids`` on one case) each in a thread of its own, strictly one at a time: a
job parks when it reaches a unit, and a unit is loaded once every unfinished job waits for it
or for a later one. So each graph call (the vision graph, the prefill, every decode step)
reads each unit once for all the jobs, and what runs is the graph code itself, op for op, on
the same shapes: the results equal those of the whole model in memory, bit for bit.

Peak memory: the largest unit (at 11B the float32 embedding or lm_head, 2.1 GB; a decoder
layer is 0.87 GB), the small tensors (0.45 GB at 11B) and the jobs' activations.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mllama_export.engines.backend import TorchBackend
from mllama_export.engines.runner import Runner
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.layers import grouped_attention
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.model import DecodeGraph, MllamaModel, PrefillGraph, VisionGraph
from mllama_export.graphs.progress import info
from mllama_export.graphs.vision import VisionAttention
from mllama_export.graphs.weights import Checkpoint, computed_buffers

# Above this many bytes of attention scores (float32, three live copies), the vision encoder's
# attention runs in chunks of query rows: 11B's 6,432-token tiles would need 8 GB per image.
# Never reached on tiny, so there the computation is exactly the graph's.
ATTENTION_BUDGET = 1 << 30


def unit_prefixes(config: MllamaConfig) -> list[str]:
    """The units, in the order every graph runs them."""
    v, t = config.vision, config.text
    return [
        *(f"vision.transformer.layers.{i}" for i in range(v.num_layers)),
        *(f"vision.global_transformer.layers.{i}" for i in range(v.num_global_layers)),
        "text.embed_tokens",
        *(f"text.layers.{i}" for i in range(t.num_layers)),
        "text.lm_head",
    ]


def read_float(checkpoint: Checkpoint, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One checkpoint tensor in ``dtype``, filled block by block (no second full copy)."""
    stored = checkpoint.tensors[name]
    whole = torch.empty(stored.shape, dtype=dtype)
    flat, at = whole.view(-1), 0
    for block in checkpoint.blocks(name, dtype):
        flat[at : at + block.numel()] = block.reshape(-1)
        at += block.numel()
        del block
    return whole


class LazyModel:
    """An MllamaModel of ``checkpoint`` whose units are loaded on demand, its parameters in
    ``dtype`` (float32 by default; the rope frequencies stay float32, as load_model does)."""

    def __init__(
        self, checkpoint: Checkpoint, semantics: str = "meta", dtype: torch.dtype = torch.float32
    ):
        self.checkpoint, self.config, self.dtype = checkpoint, checkpoint.config, dtype
        with torch.device("meta"):
            self.model = MllamaModel(self.config, semantics).eval()
        self.units = unit_prefixes(self.config)
        self._prefixes = [p + "." for p in self.units]
        self._unit_of: dict[str, int | None] = {}
        resident = {n: read_float(checkpoint, n, dtype) for n in self._resident()}
        self.model.load_state_dict(resident, assign=True, strict=False)
        for name, tensor in computed_buffers(self.config).items():
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, tensor)
        self.scheduler: LayerMajor | None = None
        self._hook_units()
        self.graphs = self._graphs()

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
        vision, prefill, decode = (TorchBackend(g) for g in self.graphs)
        backends = {"vision": vision, "prefill": prefill, "decode": decode}
        return Runner(self.config, backends, limits, str(self.dtype).removeprefix("torch."))

    def _graphs(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        graphs = VisionGraph(self.model), PrefillGraph(self.model), DecodeGraph(self.model)
        for graph in graphs:
            kind = type(graph).__name__
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
        # entries the graphs call other than forward: a self-attention layer's prefill() and
        # step(), and the cross-attention's kv() (the vision graph's only use of the layer)
        for i, layer in enumerate(self.model.text.layers):
            unit = self.units.index(f"text.layers.{i}")
            targets = [(layer, "prefill"), (layer, "step")]
            targets += [(layer.cross_attn, "kv")] if hasattr(layer, "cross_attn") else []
            for owner, method in targets:
                if hasattr(owner, method):
                    wrapped = _arriving(
                        getattr(owner, method), functools.partial(self._arrive, unit)
                    )
                    setattr(owner, method, wrapped)
        for module in self.model.vision.modules():
            if isinstance(module, VisionAttention):
                module.forward = functools.partial(chunked_vision_attention, module)


def _arriving(method: Callable, arrive: Callable[[], None]) -> Callable:
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        arrive()
        return method(*args, **kwargs)

    return wrapper


def chunked_vision_attention(
    attn: VisionAttention, x: torch.Tensor, allowed: torch.Tensor, budget: int = ATTENTION_BUDGET
) -> torch.Tensor:
    """VisionAttention.forward itself while its scores fit ``budget``; else the same
    attention one image and a block of query rows at a time (equal up to float rounding)."""
    # x: [N, L, D]; allowed: [N, 1, L, L]
    n, length, dim = x.shape
    rows = max(1, budget // (12 * attn.num_heads * length))  # float32 scores, 3 live copies
    if n * length <= rows:
        return VisionAttention.forward(attn, x, allowed)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, length, attn.num_heads, -1).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    out = torch.empty_like(q)
    for i in range(n):
        for start in range(0, length, rows):
            part = slice(start, start + rows)
            out[i : i + 1, :, part] = grouped_attention(
                q[i : i + 1, :, part], k[i : i + 1], v[i : i + 1], allowed[i : i + 1, :, part]
            )
    return attn.o_proj(out.transpose(1, 2).reshape(n, length, dim))


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

    def __init__(self, lazy: LazyModel):
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
        if kind == "VisionGraph":
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
