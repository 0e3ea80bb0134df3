"""TensorRT engines: a stage of its own, run on an artifact folder whose ONNX graphs and
manifest are already complete and committed.

`prepare_engines` runs inside the ONNX stage: it writes `engines/trtexec.sh` (the same builds
as trtexec command lines, to rebuild or debug by hand, or to build on another machine) and
returns the manifest's first `tensorrt` entry (engines pending, skipped, or unavailable with
the reason in one line). `build_engines` then builds each pending engine into the committed
folder: written under a temporary name and renamed, recorded in the manifest (rewritten
atomically) after each one. A failed engine records TensorRT's own message and leaves the
ONNX, the manifest and trtexec.sh as they were; `mllama-export engines DIR` retries.

Every engine is built from a strongly typed network, whatever its precision: the graphs carry
their types (float32 norm statistics, softmax and logits; FP8 Q/DQ), TensorRT 11 builds
nothing else ("Since 11.0, TensorRT supports only Strongly Typed networks", its precision
control docs; its Python bindings have no BuilderFlag.FP16/BF16, python/src/infer/pyCore.cpp
at 11.1), and on TensorRT 10 strong typing keeps those float32 islands in float32.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mllama_export.engines.manifest_read import MANIFEST, read_manifest
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.choices import ENGINE_MODES, PRECISIONS
from mllama_export.graphs.family import Family, family_of, family_of_config
from mllama_export.graphs.progress import info

from .manifest import write_manifest

ENGINE_DIR = "engines"
TIMING_CACHE = f"{ENGINE_DIR}/timing.cache"
TRTEXEC_SCRIPT = f"{ENGINE_DIR}/trtexec.sh"
# FP8 tensor-core GEMMs: Ada (8.9) and Hopper (9.0) on; an A100 (8.0) has none
FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class EngineBuild:
    """How one graph becomes one engine: the same facts drive Polygraphy and trtexec."""

    graph: str
    onnx: str  # relative to the artifact folder
    engine: str  # relative to the artifact folder
    precision: str  # what the graph's types are; the network is strongly typed for all
    profiles: tuple  # the family's ShapeProfiles (its "profiles" part)


def retry_command(folder: Path) -> str:
    return f"mllama-export engines {shlex.quote(str(folder))}"


def plan_engines(
    graphs: dict[str, dict],
    profiles: dict[str, list],
    precision: str,
    engines: tuple[str, ...] | None = None,
    order: tuple[str, ...] | None = None,
) -> list[EngineBuild]:
    """One plan per graph of `graphs` ({name: {"file": "onnx/<name>.onnx", ...}}) that gets
    an engine (`engines`, default all: Mllama's shared text engine has none for prefill), in
    the family's graph ``order`` (default: the first family's); a graph's own "precision"
    entry, where present, overrides the build's (FP8 text beside a 16-bit vision graph)."""
    plans = []
    order = tuple(order or _first_family().graphs)
    names = [g for g in graphs if engines is None or g in engines]
    for name in sorted(names, key=lambda g: order.index(g) if g in order else len(order)):
        if name not in profiles:
            raise MllamaExportError(f"no optimization profiles for a graph named {name!r}")
        graph_precision = graphs[name].get("precision", precision)
        if graph_precision not in PRECISIONS:
            raise MllamaExportError(
                f"no TensorRT settings for precision {graph_precision!r}; known: "
                + ", ".join(PRECISIONS)
            )
        engine = f"{ENGINE_DIR}/{name}.engine"
        plans.append(
            EngineBuild(
                name, str(graphs[name]["file"]), engine, graph_precision, tuple(profiles[name])
            )
        )
    return plans


def trtexec_args(plan: EngineBuild, optimization_level: int | None = None) -> list[str]:
    """trtexec's arguments for one engine, paths relative to the artifact folder. No precision
    flag: trtexec 11 no longer parses --fp16/--bf16 (samples/common/sampleOptions.cpp at
    11.1) and exits on them; --stronglyTyped parses on 10.0 through 11.1 (a no-op on 11)."""
    args = [
        f"--onnx={plan.onnx}",
        f"--saveEngine={plan.engine}.partial",  # renamed once complete (the script's mv)
        f"--timingCacheFile={TIMING_CACHE}",
        "--stronglyTyped",
        "--noTF32",  # trtexec enables TF32 by default; Polygraphy (our build) does not
        "--profilingVerbosity=detailed",  # as Polygraphy's default: layer info for inspection
    ]
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


def trtexec_script(plans: list[EngineBuild], optimization_level: int | None = None) -> str:
    lines = [
        "#!/bin/sh",
        "# Builds this folder's TensorRT engines by hand with trtexec (TensorRT 10 or 11):",
        "# the same strongly typed networks, optimization profiles and timing cache as",
        "# `mllama-export build`. Usage: sh engines/trtexec.sh ["
        + "] [".join(p.graph for p in plans)
        + "]",
        "# (default: all of them). TRTEXEC=/path/to/trtexec picks the binary; TRTEXEC_FLAGS adds",
        "# flags to every build (e.g. --verbose). Each engine is written as <name>.partial and",
        "# renamed when trtexec succeeds. Engines built by hand are not in manifest.json:",
        "# `mllama-export engines DIR` builds and records them, or load them with",
        "# mllama_export.engines.tensorrt.TensorRTBackend.",
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
            f"# {plan.graph}: {plan.precision} graph, strongly typed, {len(plan.profiles)} "
            "profiles" + (f" over {dims}" if dims else ""),
            f'case " $GRAPHS " in *" {plan.graph} "*)',
            '    echo "building ' + plan.engine + '" >&2',
            '    "$TRTEXEC" $TRTEXEC_FLAGS \\',
        ]
        args = [shlex.quote(a) for a in trtexec_args(plan, optimization_level)]
        lines += [f"        {a} \\" for a in args[:-1]] + [f"        {args[-1]}"]
        lines += [f"    mv {plan.engine}.partial {plan.engine}", "    ;;", "esac", ""]
    return "\n".join(lines)


# -- what can be refused before any work ------------------------------------------------------


def tensorrt_unavailable(needs_fp8: bool = False) -> str | None:
    """Why engines cannot be built here, in one line; None when they can."""
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # ImportError, or OSError for a missing libnvinfer
        return f"TensorRT is not installed ({type(err).__name__}: {err})"
    try:
        import polygraphy.backend.trt  # noqa: F401
    except Exception as err:
        return f"Polygraphy's TensorRT backend cannot be imported ({err})"
    gpu = cuda_device()
    if gpu is None:
        return "no CUDA GPU is visible"
    name, capability = gpu
    if needs_fp8 and capability < FP8_CAPABILITY:
        return (
            f"FP8 engines need a GPU of compute capability {_cc(FP8_CAPABILITY)} or later "
            f"(Ada, Hopper); this {name} has {_cc(capability)}"
        )
    return None


def cuda_device() -> tuple[str, tuple[int, ...]] | None:
    """(name, compute capability) of the current CUDA GPU; None where none is visible."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability())


def _cc(capability) -> str:
    return ".".join(str(c) for c in capability)


def _first_family() -> Family:
    from mllama_export.graphs.family import families

    return families()[0]


def _profiles(family: Family):
    """The family's optimization-profile scheme; None for a family without one (no engines)."""
    return family.part("profiles") if family.has("profiles") else None


def check_tensor_volumes(
    config: Any,
    limits,
    scheme: Any = None,
    rebuild_hint="",
    text_engine: str = "split",
) -> None:
    """Refuses limits at which some engine tensor would exceed TensorRT's element cap, naming
    the tensor and the largest value of each option that lowers it (``scheme``: default, the
    family's DEFAULT_SCHEME). A family without profiles builds no engine: nothing to refuse."""
    profiles = _profiles(family_of(config))
    if profiles is None:
        return
    scheme = scheme or profiles.DEFAULT_SCHEME
    problems = profiles.tensor_volume_problems(config, limits, scheme, text_engine)
    if not problems:
        return
    worst = problems[0]
    fixes = []
    for name in worst.limits:
        best = profiles.largest_fitting(config, limits, name, scheme, text_engine)
        if best is not None:
            fixes.append(f"--{name.replace('_', '-')} {best}")
    shape = "x".join(str(d) for d in worst.shape)
    raise MllamaExportError(
        f"the {worst.graph} engine's {worst.tensor} would be {shape} = {worst.volume:,} "
        f"elements at profile {worst.profile}'s maximum, over TensorRT's limit of "
        f"2^31-1 per tensor ({len(problems)} tensor(s) over in all); "
        + (f"lower it with {' or '.join(fixes)}" if fixes else "lower several limits at once")
        + (rebuild_hint or ", or pass --engines skip for ONNX artifacts only")
    )


def check_engines_before_work(options, config: Any) -> None:
    """`build --engines`: auto and require refuse a profile over TensorRT's tensor cap; require
    also refuses a machine where engines cannot be built (TensorRT, a CUDA GPU, and compute
    capability 8.9 for FP8)."""
    mode = getattr(options, "engines", "auto")
    if mode not in ENGINE_MODES:
        raise MllamaExportError(
            f"invalid build options: engines {mode!r} (available: {', '.join(ENGINE_MODES)})"
        )
    if mode == "skip":
        return
    family = family_of(config)
    if mode == "require" and _profiles(family) is None:
        raise MllamaExportError(
            f"--engines require: the {family.title} family has no TensorRT optimization "
            "profiles; use --engines auto or skip for the ONNX artifacts alone"
        )
    check_tensor_volumes(config, options, text_engine=options.text_engine)
    if mode == "require":
        reason = tensorrt_unavailable(needs_fp8=options.precision == "fp8")
        if reason is not None:
            raise MllamaExportError(
                f"--engines require: engines cannot be built here: {reason}; use --engines "
                "auto or skip for the ONNX artifacts alone"
            )


# -- the manifest entry -------------------------------------------------------------------


def prepare_engines(
    work: Path,
    graphs: dict[str, dict],
    config: Any,
    options,
    *,
    scheme: Any = None,
    optimization_level: int | None = None,
) -> dict[str, Any]:
    """In the ONNX stage: writes engines/trtexec.sh into `work` and returns the manifest's
    `tensorrt` entry before any engine exists (status pending, skipped or unavailable). A
    rebuild into the same --out keeps the last build's timing cache when it was measured by
    this TensorRT on this GPU. ``scheme``: default, the family's DEFAULT_SCHEME."""
    family = family_of(config)
    part = _profiles(family)
    if part is None:
        reason = f"the {family.title} family has no TensorRT optimization profiles"
        info(f"no TensorRT engines built: {reason}")
        return {"built": False, "status": "unavailable", "reason": reason}
    scheme = scheme or part.DEFAULT_SCHEME
    profiles = part.all_profiles(config, options, scheme, options.text_engine)
    engines = part.engine_graphs(options.text_engine)
    plans = plan_engines(graphs, profiles, options.precision, engines, tuple(family.graphs))
    (work / ENGINE_DIR).mkdir(exist_ok=True)
    script = work / TRTEXEC_SCRIPT
    script.write_text(trtexec_script(plans, optimization_level))
    script.chmod(0o755)
    entry: dict[str, Any] = {
        "built": False,
        "text_engine": options.text_engine,
        "trtexec": TRTEXEC_SCRIPT,
        "scheme": asdict(scheme),
        "optimization_level": optimization_level,
        "profiles": {p.graph: [q.to_json() for q in p.profiles] for p in plans},
        "engines": {p.graph: {"status": "pending", "precision": p.precision} for p in plans},
    }
    mode = getattr(options, "engines", "auto")
    if mode == "skip":
        reason = f"--engines skip; {retry_command(Path(options.out))} builds them"
        info(f"no TensorRT engines built: {reason}")
        return {**entry, "status": "skipped", "reason": reason}
    reason = tensorrt_unavailable(needs_fp8=any(p.precision == "fp8" for p in plans))
    if reason is not None:
        reason = (
            f"{reason}; {retry_command(Path(options.out))} builds them where TensorRT "
            f"runs, or {TRTEXEC_SCRIPT} by hand"
        )
        info(f"no TensorRT engines built: {reason}")
        return {**entry, "status": "unavailable", "reason": reason}
    version, device = _here()
    _reuse_timing_cache(Path(options.out), work, version, device)
    return {**entry, "status": "pending", "reason": "engines not built yet"}


def _here() -> tuple[str, str]:
    """(TensorRT version, GPU name) of this machine: what a timing cache and engines are for."""
    import tensorrt as trt

    gpu = cuda_device()
    return trt.__version__, gpu[0] if gpu else "no GPU"


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


# -- the engine stage ---------------------------------------------------------------------


def pending_engines(manifest: dict, names=None, rebuild: bool = False) -> list[str]:
    """The engines a run of the stage builds: `names` (default all) that are not built yet,
    failed, or were built by another TensorRT or on another GPU; all of them with `rebuild`."""
    entry = manifest.get("tensorrt") or {}
    engines = entry.get("engines") or {}
    if not engines:
        profiles = _manifest_family(manifest).part("profiles")
        engines = dict.fromkeys(profiles.engine_graphs(entry.get("text_engine", "split")))
    known = tuple(engines)
    names = list(names or known)
    unknown = [n for n in names if n not in known]
    if unknown:
        shared = entry.get("text_engine") == "shared" and "prefill" in unknown
        raise MllamaExportError(
            f"unknown engine(s) {', '.join(unknown)}; expected some of {', '.join(known)}"
            + (" (a shared text engine: the decode engine serves prefill)" if shared else "")
        )
    if rebuild:
        return names
    stale = entry.get("version") != _here()[0] or entry.get("device") != _here()[1]
    return [n for n in names if stale or (engines.get(n) or {}).get("status") != "built"]


def build_engines(folder: Path, names: list[str]) -> dict[str, Any]:
    """Builds the engines `names` into the committed artifact `folder`, one after the other,
    and returns the manifest's final `tensorrt` entry. The caller holds the folder's build
    lock and has checked the machine (tensorrt_unavailable) and the ONNX files (sha256).

    Raises MllamaExportError naming the engine and TensorRT's own message when one fails;
    the manifest then records it, and the engines before it stay built."""
    from .tensorrt_build import EngineBuildError, build_engine

    folder = Path(folder)
    manifest = read_manifest(folder)
    entry = manifest["tensorrt"]
    version, device = _here()
    _start_stage(folder, manifest, version, device)
    plans = {p.graph: p for p in _plans_from_manifest(manifest)}
    for name in names:
        plan = plans[name]
        info(
            f"building the {name} TensorRT engine ({plan.precision} graph, strongly typed, "
            f"{len(plan.profiles)} profiles)"
        )
        _record(folder, manifest, name, {"status": "building", "precision": plan.precision})
        try:
            result = build_engine(plan, folder, _quantized(manifest, name), entry)
        except EngineBuildError as err:
            _record(folder, manifest, name, err.record(plan))
            raise MllamaExportError(
                f"the {name} TensorRT engine failed: {err.message}; the ONNX artifacts in "
                f"{folder} are complete (run and validate work on ONNX Runtime), the manifest "
                f"records the failure and its log ({err.log}); retry with "
                f"`{retry_command(folder)}`"
            ) from err
        _record(folder, manifest, name, result)
    return manifest["tensorrt"]


def _plans_from_manifest(manifest: dict) -> list[EngineBuild]:
    """The plans the manifest recorded when the ONNX was built: the very same profiles."""
    entry = manifest["tensorrt"]
    family = _manifest_family(manifest)
    shape_profile = family.part("profiles").ShapeProfile
    profiles = {
        g: [shape_profile.from_json(p) for p in ps] for g, ps in entry.get("profiles", {}).items()
    }
    order = tuple(family.graphs)
    return plan_engines(manifest["graphs"], profiles, manifest["precision"], tuple(profiles), order)


def _manifest_family(manifest: dict) -> Family:
    config = (manifest.get("model") or {}).get("config") or {}
    return family_of_config(config, f"{MANIFEST}'s model config")


def _quantized(manifest: dict, name: str) -> int:
    return len(manifest["graphs"][name].get("quantized_layers") or [])


def _start_stage(folder: Path, manifest: dict, version: str, device: str) -> None:
    """This TensorRT and GPU take over the folder's engines; a timing cache and engines
    from another TensorRT or GPU are dropped (ours; TensorRT would refuse them anyway)."""
    entry = manifest["tensorrt"]
    if (entry.get("version"), entry.get("device")) != (version, device):
        (folder / TIMING_CACHE).unlink(missing_ok=True)
        for name, engine in (entry.get("engines") or {}).items():
            if engine.get("status") == "built":
                (folder / engine["file"]).unlink(missing_ok=True)
                entry["engines"][name] = {"status": "pending", "precision": engine.get("precision")}
    for stale in (folder / ENGINE_DIR).glob("*.partial*"):
        stale.unlink()
    entry.update(
        version=version,
        device=device,
        compute_capability=_cc((cuda_device() or ("", ()))[1]),
        timing_cache=TIMING_CACHE,
    )


def _record(folder: Path, manifest: dict, name: str, engine: dict) -> None:
    """One engine's status into the manifest, rewritten atomically with the files' hashes."""
    entry = manifest["tensorrt"]
    entry.setdefault("engines", {})[name] = engine
    statuses = {e.get("status") for e in entry["engines"].values()}
    entry["built"] = statuses == {"built"}
    entry["status"] = "built" if entry["built"] else "failed" if "failed" in statuses else "pending"
    if entry["built"]:
        entry.pop("reason", None)
    else:
        failed = [g for g, e in entry["engines"].items() if e.get("status") == "failed"]
        waiting = [g for g, e in entry["engines"].items() if e.get("status") != "built"]
        entry["reason"] = (
            f"the {failed[0]} engine failed: {entry['engines'][failed[0]]['error']}"
            if failed
            else f"engines {', '.join(waiting)} not built yet"
        ) + f"; {retry_command(folder)} builds them"
    (folder / f"{TIMING_CACHE}.lock").unlink(missing_ok=True)  # Polygraphy's side file
    changed = {TIMING_CACHE, f"{ENGINE_DIR}/{name}.engine", f"{ENGINE_DIR}/{name}.log"}
    known = {k: v for k, v in manifest["files"].items() if k not in changed}
    write_manifest(folder, manifest, known=known)
    manifest["files"] = read_manifest(folder)["files"]


def limits_problem_hint(manifest: dict) -> str:
    """For `engines DIR`: which build options made the ONNX, and that the limits are its."""
    lim = manifest.get("limits", {})
    opts = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in lim.items())
    return f" (the ONNX was built with {opts}: rebuild it with `mllama-export build`)"
