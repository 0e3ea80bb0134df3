"""Optimization profiles as plain data, and choosing one for a call: for any family's graphs.

A `ShapeProfile` is one profile of one graph: a (min, opt, max) range per dynamic dim and the
shapes of every input read off them. A family's profile scheme (Mllama's: engines/profiles.py,
its "profiles" part) makes them; the manifest stores them as JSON; the TensorRT backend picks
one per call with `select_profile`. The consistency checks of a feed read dims by name and
apply only to graphs that have them (a text-only graph has no image_tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.spec import TensorSpec

Range = tuple[int, int, int]  # (min, opt, max)
Shape = tuple[int, ...]

# TensorRT's limit on the elements of one tensor (kernels address tensors with 32-bit offsets)
MAX_TENSOR_VOLUME = 2**31 - 1


def buckets(limit: int, first: int, growth: int) -> list[tuple[int, int]]:
    """Contiguous ranges covering exactly 1..limit: [1, first], [first+1, first*growth], ...,
    the last one ending at limit."""
    if limit < 1:
        raise MllamaExportError(f"cannot bucket the range 1..{limit}: the limit must be >= 1")
    edges, edge = [], first
    while edge < limit:
        edges.append(edge)
        edge *= growth
    edges.append(limit)
    ranges, lo = [], 1
    for hi in edges:
        ranges.append((lo, hi))
        lo = hi + 1
    return ranges


@dataclass(frozen=True)
class VolumeProblem:
    """A tensor over TensorRT's element cap at one profile's maximum."""

    graph: str
    profile: int
    tensor: str
    shape: tuple[int, ...]
    limits: tuple[str, ...]  # the build limits whose lowering shrinks it

    @property
    def volume(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class HasLimits(Protocol):
    """BuildOptions or the runner's Limits: what the artifacts promise to accept."""

    max_batch: int
    max_seq_len: int
    max_images: int


def logits_range(ranges: Mapping[str, Range], vocab: int) -> Range:
    """num_logits 1..the profile's top count of positions (prompt, or new tokens of a step
    graph), tuned for 1 (serving), capped so that the logits [batch, num_logits, vocab] stay
    within TensorRT's tensor volume limit."""
    batch, seq = ranges["batch"][2], ranges.get("sequence", ranges.get("new_tokens"))[2]
    return (1, 1, max(1, min(seq, MAX_TENSOR_VOLUME // (batch * vocab))))


def volume_problems(
    profiles: Mapping[str, Sequence[ShapeProfile]],
    tensor_shapes: Callable[[ShapeProfile], Mapping[str, tuple[Shape, tuple[str, ...]]]],
    lowers: Callable[[tuple[str, ...]], tuple[str, ...]],
) -> list[VolumeProblem]:
    """Every tensor over MAX_TENSOR_VOLUME at some profile's maximum, the largest first.
    ``profiles``: per graph; ``tensor_shapes``: a profile's tensors (name: its shape at the
    maximum, its named dims); ``lowers``: the build limits that shrink a tensor of those dims."""
    problems = []
    for graph, graph_profiles in profiles.items():
        for p in graph_profiles:
            for name, (shape, dims) in tensor_shapes(p).items():
                problem = VolumeProblem(graph, p.index, name, shape, lowers(dims))
                if problem.volume > MAX_TENSOR_VOLUME:
                    problems.append(problem)
    return sorted(problems, key=lambda q: -q.volume)


def largest_limit(
    limits: HasLimits, name: str, problems: Callable[[Limits], Sequence[VolumeProblem]]
) -> int | None:
    """The largest value of the limit `name` (the others kept) at which ``problems`` finds
    no tensor over the cap; None when even 1 does not fit."""
    base = Limits(limits.max_batch, limits.max_seq_len, limits.max_images)
    lo, hi = 0, getattr(base, name)  # invariant: lo fits (or is 0), hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if problems(replace(base, **{name: mid})):
            hi = mid - 1
        else:
            lo = mid
    return lo or None


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile of one graph: per-dim ranges and per-input shapes."""

    graph: str
    index: int
    ranges: dict[str, Range]  # every dynamic dim the graph's inputs use, image_tokens included
    inputs: dict[str, tuple[str, ...]]  # input name -> its named dims, in the graph's order
    shapes: dict[str, tuple[Shape, Shape, Shape]] = field(repr=False)  # name -> (min, opt, max)
    phase: str = ""  # what the calls in it are: vision, prefill, decode or chunk

    @classmethod
    def from_ranges(
        cls,
        graph: str,
        index: int,
        ranges: Mapping[str, Range],
        specs: Sequence[TensorSpec],
        fixed: Mapping[str, int],
        phase: str = "",
        dynamic: Sequence[str] | None = None,
    ) -> ShapeProfile:
        """Shapes of every input read off one table of dim sizes, so shared dims agree.
        dynamic: the family's dynamic dims, in the order the profile lists them (None: every
        dim not in `fixed`, in the order of `ranges`)."""
        order = list(ranges) if dynamic is None else list(dynamic)
        used = {d for s in specs for d in s.dims if (d in order if dynamic else d not in fixed)}
        missing = used - set(ranges)
        if missing:
            raise MllamaExportError(f"{graph} profile {index} has no range for {sorted(missing)}")
        table = [{**fixed, **{d: r[k] for d, r in ranges.items()}} for k in range(3)]
        shapes = {s.name: tuple(s.shape(sizes) for sizes in table) for s in specs}
        return cls(
            graph,
            index,
            {d: tuple(ranges[d]) for d in order if d in used},
            {s.name: s.dims for s in specs},
            shapes,
            phase or graph,
        )

    def contains(self, feed_shapes: Mapping[str, Sequence[int]]) -> bool:
        for name, (lo, _, hi) in self.shapes.items():
            shape = feed_shapes.get(name)
            if shape is None or len(shape) != len(lo):
                return False
            if any(not a <= int(x) <= b for a, x, b in zip(lo, shape, hi, strict=True)):
                return False
        return True

    def volume(self) -> int:
        """Elements of all inputs at the profile's max shapes: what 'smallest' compares."""
        total = 0
        for _, _, hi in self.shapes.values():
            n = 1
            for d in hi:
                n *= d
            total += n
        return total

    def describe(self) -> str:
        dims = ", ".join(f"{d} {lo}..{hi}" for d, (lo, _, hi) in self.ranges.items())
        return dims if self.phase in ("", self.graph) else f"{self.phase}: {dims}"

    def trtexec_shapes(self) -> dict[str, str]:
        """{'min': 'input_ids:1x1,position_ids:1x1,...', 'opt': ..., 'max': ...}, the values
        of trtexec's --minShapes/--optShapes/--maxShapes for this profile."""
        return {
            key: ",".join(
                f"{name}:{'x'.join(str(d) for d in shapes[k])}"
                for name, shapes in self.shapes.items()
            )
            for k, key in enumerate(("min", "opt", "max"))
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "index": self.index,
            "phase": self.phase,
            "dims": {d: {"min": r[0], "opt": r[1], "max": r[2]} for d, r in self.ranges.items()},
            "inputs": {
                name: {
                    "dims": list(self.inputs[name]),
                    "min": list(s[0]),
                    "opt": list(s[1]),
                    "max": list(s[2]),
                }
                for name, s in self.shapes.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShapeProfile:
        try:
            return cls(
                str(data["graph"]),
                int(data["index"]),
                {d: (int(r["min"]), int(r["opt"]), int(r["max"])) for d, r in data["dims"].items()},
                {name: tuple(v["dims"]) for name, v in data["inputs"].items()},
                {
                    name: tuple(tuple(int(x) for x in v[k]) for k in ("min", "opt", "max"))
                    for name, v in data["inputs"].items()
                },
                str(data.get("phase") or data["graph"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise MllamaExportError(
                f"malformed optimization profile in the manifest ({err!r}); rebuild the engines"
            ) from err


def coverage(profiles: Sequence[ShapeProfile]) -> dict[str, tuple[int, int]]:
    """The lowest and highest value of each dim over all profiles."""
    out: dict[str, tuple[int, int]] = {}
    for p in profiles:
        for d, (lo, _, hi) in p.ranges.items():
            a, b = out.get(d, (lo, hi))
            out[d] = (min(a, lo), max(b, hi))
    return out


def feed_dims(
    profiles: Sequence[ShapeProfile], feed_shapes: Mapping[str, Sequence[int]]
) -> dict[str, list[tuple[str, int]]]:
    """Each dynamic dim's values in a feed, with the input each came from."""
    seen: dict[str, list[tuple[str, int]]] = {}
    if not profiles:
        return seen
    for name, dims in profiles[0].inputs.items():
        shape = feed_shapes.get(name)
        if shape is None or len(shape) != len(dims):
            continue
        for d, x in zip(dims, shape, strict=True):
            if d in profiles[0].ranges:
                seen.setdefault(d, []).append((name, int(x)))
    return seen


def select_profile(
    profiles: Sequence[ShapeProfile], feed_shapes: Mapping[str, Sequence[int]]
) -> int:
    """The position in `profiles` of the smallest profile containing every input's shape.

    The feed must be consistent first: every input present with its rank, the model's fixed
    dims as built, each shared dim equal across inputs, image_tokens = num_images x tiles x
    patches. Raises MllamaExportError naming the shapes, what is wrong and the ranges built."""
    if not profiles:
        raise MllamaExportError("no optimization profiles to choose from; rebuild the engines")
    problems = shape_problems(profiles, feed_shapes)
    if not problems:
        best = None
        for i, p in enumerate(profiles):
            if p.contains(feed_shapes) and (best is None or p.volume() < profiles[best].volume()):
                best = i
        if best is not None:
            return best
        seen = feed_dims(profiles, feed_shapes)
        problems = [
            f"{d} {seen[d][0][1]} outside {lo}..{hi}"
            for d, (lo, hi) in coverage(profiles).items()
            if d in seen and not lo <= seen[d][0][1] <= hi
        ]
    shapes = ", ".join(f"{n} {list(s)}" for n, s in feed_shapes.items())
    covered = ", ".join(f"{d} {lo}..{hi}" for d, (lo, hi) in coverage(profiles).items())
    raise MllamaExportError(
        f"no {profiles[0].graph} optimization profile fits the shapes {shapes}"
        + (f" ({'; '.join(problems)})" if problems else "")
        + f"; the engine's {len(profiles)} profiles cover {covered}"
    )


def shape_problems(
    profiles: Sequence[ShapeProfile], feed_shapes: Mapping[str, Sequence[int]]
) -> list[str]:
    """What makes a feed inconsistent with the graph, whatever the profile ranges."""
    expected = profiles[0].inputs
    wrong = sorted(
        n
        for n in set(expected) | set(feed_shapes)
        if n not in feed_shapes or n not in expected or len(feed_shapes[n]) != len(expected[n])
    )
    if wrong:
        layout = "; ".join(f"{n} [{', '.join(d)}]" for n, d in expected.items())
        return [f"inputs {', '.join(wrong)} missing, unknown or of the wrong rank ({layout})"]
    problems = _fixed_mismatches(profiles[0], feed_shapes)
    seen = feed_dims(profiles, feed_shapes)
    for d, values in seen.items():
        if len({x for _, x in values}) > 1:
            problems.append(
                f"{d} differs between inputs (" + ", ".join(f"{x} in {n}" for n, x in values) + ")"
            )
    return (
        problems
        + _image_token_mismatch(profiles[0], seen)
        + _logits_past_the_prompt(seen)
        + _total_mismatch(seen)
    )


def _fixed_mismatches(profile: ShapeProfile, feed_shapes: Mapping[str, Sequence[int]]) -> list:
    out = []
    for name, dims in profile.inputs.items():
        shape = feed_shapes.get(name)
        if shape is None or len(shape) != len(dims):
            continue
        lo = profile.shapes[name][0]
        for axis, (d, x) in enumerate(zip(dims, shape, strict=True)):
            if d not in profile.ranges and int(x) != lo[axis]:
                out.append(f"{name} axis {axis} ({d}) is {x}; the model fixes it at {lo[axis]}")
    return out


def _logits_past_the_prompt(seen: dict) -> list:
    logits = seen.get("num_logits")
    for dim, what in (("sequence", "the prompt"), ("new_tokens", "the new tokens")):
        tokens = seen.get(dim)
        if logits and tokens and logits[0][1] > tokens[0][1] >= 1:
            return [
                f"num_logits {logits[0][1]} is more than {dim} {tokens[0][1]} "
                f"(logit_positions are positions of {what})"
            ]
    return []


def _total_mismatch(seen: dict) -> list:
    total, past, new = (seen.get(d) for d in ("total_sequence", "past_sequence", "new_tokens"))
    if total and past and new and total[0][1] != past[0][1] + new[0][1]:
        return [
            f"total_sequence {total[0][1]} (attention_mask) is not past_sequence "
            f"{past[0][1]} + new_tokens {new[0][1]}"
        ]
    return []


def _image_token_mismatch(profile: ShapeProfile, seen: dict) -> list:
    if "image_tokens" not in profile.ranges or not seen.get("image_tokens"):
        return []
    per_image = profile.ranges["image_tokens"][0] // profile.ranges["num_images"][0]
    images = seen.get("num_images", [("", None)])[0][1]
    tokens = seen["image_tokens"][0][1]
    if images is not None and tokens != images * per_image:
        return [f"image_tokens {tokens} is not num_images {images} x {per_image} (tiles x patches)"]
    return []
