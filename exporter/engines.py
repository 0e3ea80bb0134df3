"""TensorRT engines from the exported ONNX graphs, one per graph, several profiles each.

`build_engines` always writes `engines/trtexec.sh` (the same builds as trtexec command lines,
to rebuild or debug by hand, or to build on another machine) and returns the manifest's
`tensorrt` entry. Engines themselves are built only where TensorRT imports and a CUDA GPU is
visible; elsewhere the entry says `built: false` with the reason in one line. TensorRT and
Polygraphy's TensorRT backend are imported lazily, inside the build.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mllama_export.engines.profiles import DEFAULT_SCHEME, ProfileScheme, ShapeProfile, all_profiles
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig

from .manifest import MANIFEST

ENGINE_DIR = "engines"
TIMING_CACHE = f"{ENGINE_DIR}/timing.cache"
TRTEXEC_SCRIPT = f"{ENGINE_DIR}/trtexec.sh"
GRAPH_ORDER = ("vision", "prefill", "decode")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EnginePlan:
    """How one graph becomes one engine: the same facts drive Polygraphy and trtexec."""

    graph: str
    onnx: str  # relative to the artifact folder
    engine: str  # relative to the artifact folder
    precision: str
    strongly_typed: bool  # FP8 graphs: the ONNX types (Q/DQ included) are obeyed as written
    flags: tuple[str, ...]  # builder precision flags of weakly typed networks: fp16, bf16
    profiles: tuple[ShapeProfile, ...]


def precision_flags(precision: str) -> tuple[bool, tuple[str, ...]]:
    """(strongly typed, precision flags). fp32 keeps TF32 off, as Polygraphy's default does."""
    table = {"fp32": (False, ()), "fp16": (False, ("fp16",)), "bf16": (False, ("bf16",))}
    table["fp8"] = (True, ())
    if precision not in table:
        raise MllamaExportError(
            f"no TensorRT settings for precision {precision!r}; known: {', '.join(table)}"
        )
    return table[precision]


def plan_engines(
    graphs: dict[str, dict],
    config: MllamaConfig,
    options,
    scheme: ProfileScheme = DEFAULT_SCHEME,
) -> list[EnginePlan]:
    """One plan per graph in `graphs` ({name: {"file": "onnx/<name>.onnx", ...}}); a graph's
    own "precision" entry, where present, overrides the build's (FP8 text, bf16 vision)."""
    profiles = all_profiles(config, options, scheme)
    plans = []
    for name in sorted(graphs, key=lambda g: GRAPH_ORDER.index(g) if g in GRAPH_ORDER else 9):
        if name not in profiles:
            raise MllamaExportError(f"no optimization profiles for a graph named {name!r}")
        precision = graphs[name].get("precision", options.precision)
        strongly_typed, flags = precision_flags(precision)
        plans.append(
            EnginePlan(
                name,
                str(graphs[name]["file"]),
                f"{ENGINE_DIR}/{name}.engine",
                precision,
                strongly_typed,
                flags,
                tuple(profiles[name]),
            )
        )
    return plans


def trtexec_args(plan: EnginePlan, optimization_level: int | None = None) -> list[str]:
    """trtexec's arguments for one engine, paths relative to the artifact folder."""
    args = [
        f"--onnx={plan.onnx}",
        f"--saveEngine={plan.engine}",
        f"--timingCacheFile={TIMING_CACHE}",
    ]
    if plan.strongly_typed:
        args.append("--stronglyTyped")
    args += [f"--{flag}" for flag in plan.flags]
    args.append("--noTF32")  # trtexec enables TF32 by default; Polygraphy (our build) does not
    if optimization_level is not None:
        args.append(f"--builderOptimizationLevel={optimization_level}")
    for p in plan.profiles:
        shapes = p.trtexec_shapes()
        args += [
            f"--profile={p.index}",
            f"--minShapes={shapes['min']}",
            f"--optShapes={shapes['opt']}",
            f"--maxShapes={shapes['max']}",
        ]
    return args + ["--skipInference"]


def trtexec_script(plans: list[EnginePlan], optimization_level: int | None = None) -> str:
    lines = [
        "#!/bin/sh",
        "# Builds this folder's TensorRT engines by hand with trtexec (TensorRT 10 or later):",
        "# the same networks, precisions, optimization profiles and timing cache as",
        "# `mllama-export build`. Usage: sh engines/trtexec.sh [vision] [prefill] [decode]",
        "# (default: all three). TRTEXEC=/path/to/trtexec picks the binary; TRTEXEC_FLAGS adds",
        "# flags to every build (e.g. --verbose). Engines rebuilt by hand are not in",
        "# manifest.json: load them with mllama_export.engines.tensorrt.TensorRTBackend.",
        "set -eu",
        'cd "$(dirname "$0")/.."',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        'TRTEXEC_FLAGS="${TRTEXEC_FLAGS:-}"',
        'GRAPHS="${*:-' + " ".join(p.graph for p in plans) + '}"',
        "",
    ]
    for plan in plans:
        dims = ", ".join(
            d for d in plan.profiles[0].ranges if len({p.ranges[d] for p in plan.profiles}) > 1
        )
        lines += [
            f"# {plan.graph}: {plan.precision} ({_kind(plan)}), {len(plan.profiles)} profiles"
            + (f" over {dims}" if dims else ""),
            f'case " $GRAPHS " in *" {plan.graph} "*)',
            '    echo "building ' + plan.engine + '" >&2',
            '    "$TRTEXEC" $TRTEXEC_FLAGS \\',
        ]
        args = [shlex.quote(a) for a in trtexec_args(plan, optimization_level)]
        lines += [f"        {a} \\" for a in args[:-1]] + [f"        {args[-1]}", "    ;;", "esac"]
        lines.append("")
    return "\n".join(lines)


def _kind(plan: EnginePlan) -> str:
    if plan.strongly_typed:
        return "strongly typed"
    return "weakly typed, " + (" ".join(f"--{f}" for f in plan.flags) or "fp32 without TF32")


def tensorrt_unavailable() -> str | None:
    """Why engines cannot be built here, in one line; None when they can."""
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # ImportError, or OSError for a missing libnvinfer
        return f"TensorRT is not installed ({type(err).__name__}: {err})"
    try:
        import polygraphy.backend.trt  # noqa: F401
    except Exception as err:
        return f"Polygraphy's TensorRT backend cannot be imported ({err})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def build_engines(
    work: Path,
    graphs: dict[str, dict],
    config: MllamaConfig,
    options,
    progress: Progress = print,
    *,
    scheme: ProfileScheme = DEFAULT_SCHEME,
    optimization_level: int | None = None,
) -> dict[str, Any]:
    """Writes `engines/trtexec.sh` always, and `engines/<graph>.engine` plus
    `engines/timing.cache` where TensorRT can run; returns the manifest's `tensorrt` entry.

    work: the artifact folder being built (graphs' files are relative to it); options:
    BuildOptions (precision, max_batch, max_seq_len, max_images; out, whose previous
    engines/timing.cache is reused when the TensorRT version and GPU match)."""
    work = Path(work)
    plans = plan_engines(graphs, config, options, scheme)
    (work / ENGINE_DIR).mkdir(exist_ok=True)
    script = work / TRTEXEC_SCRIPT
    script.write_text(trtexec_script(plans, optimization_level))
    script.chmod(0o755)
    common = {
        "trtexec": TRTEXEC_SCRIPT,
        "scheme": asdict(scheme),
        "profiles": {p.graph: [q.to_json() for q in p.profiles] for p in plans},
    }
    reason = tensorrt_unavailable()
    if reason is not None:
        reason = f"{reason}; {TRTEXEC_SCRIPT} has the trtexec commands to build them"
        progress(f"no TensorRT engines built: {reason}")
        return {"built": False, "reason": reason, **common}

    import tensorrt as trt
    import torch

    device = torch.cuda.get_device_name()
    if getattr(options, "out", None) is not None:
        _reuse_timing_cache(Path(options.out), work, trt.__version__, device)
    engines = {}
    for plan in plans:
        progress(
            f"building the {plan.graph} TensorRT engine ({plan.precision}, {_kind(plan)}, "
            f"{len(plan.profiles)} profiles)"
        )
        engines[plan.graph] = _build_one(plan, work, optimization_level)
    # Polygraphy locks the timing cache through a side file it leaves behind
    (work / f"{TIMING_CACHE}.lock").unlink(missing_ok=True)
    return {
        "built": True,
        "version": trt.__version__,
        "device": device,
        "timing_cache": TIMING_CACHE,
        "engines": engines,
        **common,
    }


def _reuse_timing_cache(previous_out: Path, work: Path, version: str, device: str) -> None:
    """A rebuild into the same folder starts from the last build's tactic timings, when they
    were measured by the same TensorRT on the same GPU (a cache from elsewhere is refused)."""
    old, new = previous_out / TIMING_CACHE, work / TIMING_CACHE
    if not old.is_file() or new.exists() or old.resolve() == new.resolve():
        return
    try:
        previous = json.loads((previous_out / MANIFEST).read_text()).get("tensorrt", {})
    except (OSError, ValueError):
        return
    if previous.get("version") == version and previous.get("device") == device:
        shutil.copyfile(old, new)


def _build_one(plan: EnginePlan, work: Path, optimization_level: int | None) -> dict[str, Any]:
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        Profile,
    )
    from polygraphy.logger import G_LOGGER

    start = time.perf_counter()
    cache = work / TIMING_CACHE
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            builder, network, parser = NetworkFromOnnxPath(
                str(work / plan.onnx), strongly_typed=plan.strongly_typed
            )()
            io = _network_io(network)
            profiles = []
            for p in plan.profiles:
                profile = Profile()
                for name, (lo, opt, hi) in p.shapes.items():
                    profile.add(name, min=lo, opt=opt, max=hi)
                profiles.append(profile)
            config = CreateConfig(
                profiles=profiles,
                fp16="fp16" in plan.flags,
                bf16="bf16" in plan.flags,
                load_timing_cache=str(cache),
                builder_optimization_level=optimization_level,
            )
            engine = EngineBytesFromNetwork(
                (builder, network, parser), config=config, save_timing_cache=str(cache)
            )()
            (work / plan.engine).write_bytes(engine)
    except MllamaExportError:
        raise
    except Exception as err:  # Polygraphy and TensorRT raise their own error types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MllamaExportError(
            f"TensorRT could not build the {plan.graph} engine from {plan.onnx}: {first} "
            f"(rebuild by hand with `sh {TRTEXEC_SCRIPT} {plan.graph}` for the full log)"
        ) from err
    return {
        "file": plan.engine,
        "onnx": plan.onnx,
        "precision": plan.precision,
        "strongly_typed": plan.strongly_typed,
        "flags": list(plan.flags),
        "num_profiles": len(plan.profiles),
        **io,
        "bytes": (work / plan.engine).stat().st_size,
        "build_s": round(time.perf_counter() - start, 2),
    }


def _network_io(network) -> dict[str, list[dict]]:
    def describe(t) -> dict:
        return {"name": t.name, "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)}

    return {
        "inputs": [describe(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [describe(network.get_output(i)) for i in range(network.num_outputs)],
    }
