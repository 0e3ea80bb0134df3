"""Peak memory of `mllama-export build` at the 11B geometry as the depth grows, bf16 or fp8.

Writes synthetic checkpoints of the 11B preset (full width, real head counts and vocabulary,
bfloat16) at several text depths, with proportionally fewer vision layers (``--preset``: any
family's preset, e.g. llava-1.5-7b, truncated by its family's "truncated" part), and runs the real
`mllama-export build` on each in a child process, reading that process's peak resident set
size from the kernel (wait4's ru_maxrss). bf16 builds are not checked numerically on the
CPU, so their peak is the streaming export's: it should not grow with depth and should stay
below one decoder layer's weights plus 2 GB. fp16 and fp32 builds also run the check against
PyTorch, whose depth (the whole model, or a reduced copy) and memory estimate the build
chooses up front (exporter/checkplan.py); the table gives both, and the estimate's ratio to
the measured peak.

With --baseline-layers, the same checkpoints are also exported the usual way in a child
process: the whole model loaded, then torch.onnx.export with its own optimizer and save.

``--precision fp8`` builds FP8 artifacts: calibration layer by layer (every case of the
built-in set at once, each layer read from the checkpoint and dropped), the streamed export,
and the FP8 check where the memory estimate puts it. With ``--calibration-only``, each child
runs only the FP8 calibration (exporter/calibrate.py calibrate_streamed), whose memory is the
streamed part's alone.

    python benchmarks/export_memory.py [--preset 11b] [--layers 2 4 8] [--precision bf16|fp16|fp32|fp8]
        [--max-seq-len N (LLaVA 1.5 at 7B: 578 or more, one image's 576 tokens and two)]
        [--check-depth auto|full|reduced] [--calibration-only] [--baseline-layers 2]
        [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mllama_export.graphs.config import preset, truncated
from mllama_export.graphs.family import all_presets, family_of

GB = 1e9


def geometry(text_layers: int, name: str = "11b"):
    """The 11B preset at ``text_layers``; the vision encoder keeps the same share of its
    depth (32 local and 8 global layers for 40 text layers), at least one of each. Another
    family's preset: its "truncated" part at ``text_layers`` (which scales the vision alike)."""
    if name != "11b":
        family = all_presets()[name]
        return family.part("truncated")(family.read_config(family.presets[name]), text_layers)
    full = preset("11b")
    share = text_layers / full.text.num_layers
    cross = tuple(i for i in full.text.cross_attention_layers if i < text_layers)
    return truncated(
        full,
        text_layers,
        max(1, round(full.vision.num_layers * share)),
        max(1, round(full.vision.num_global_layers * share)),
        cross_layers=cross or (text_layers - 1,),
    )


def weight_bytes(config, dtype=torch.bfloat16) -> dict[str, int]:
    with torch.device("meta"):
        model = family_of(config).part("model")(config)
    size = dtype.itemsize
    layer = sum(p.numel() for p in model.text.layers[0].parameters()) * size
    return {
        "total": sum(p.numel() for p in model.parameters()) * size,
        "layer": layer,
        "largest": max(p.numel() for p in model.parameters()) * size,
    }


# a build's phases, by the progress line that starts each
PHASES = {
    "calibrate": "calibrating FP8 scales",
    "export": "exporting the vision graph",
    "check": "checking against PyTorch",
}
# the line a step logs when it ends (graphs/progress.py step): "what: 12 s", not a new phase
STEP_END = re.compile(r": (stopped after .*|[\d.]+ s|\d+ min \d+ s|\d+ h \d+ min)$")


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of one child process, from the kernel's accounting."""
    rss, seconds, _ = run_phased(cmd)
    return rss, seconds


def run_phased(cmd: list[str]) -> tuple[float, float, dict[str, dict]]:
    """run_measured, plus {phase: {"s": seconds, "peak_rss": bytes}} of each phase of PHASES
    the child's progress shows, from its line to the next phase's line or the end. A phase's
    peak is the child's VmHWM when the next phase starts, reset (/proc/PID/clear_refs) as
    each phase starts; the whole run's peak is the largest of them."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # progress lines as they happen
    marks: list[tuple[str, float]] = []
    peaks: list[int] = []  # VmHWM read at each mark: the previous phase's peak
    tail: list[str] = []  # the output's last lines, for the error message
    # progress goes to stderr (the CLI's click.echo(err=True)): both streams, merged
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    with child.stdout:
        for line in child.stdout:
            tail = [*tail[-40:], line]
            text = line.strip()
            name = next((k for k, v in PHASES.items() if text.startswith(v)), None)
            if STEP_END.search(text):
                name = None
            if name is not None:
                marks.append((name, time.perf_counter() - start))
                peaks.append(_reset_hwm(child.pid))
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{''.join(tail)[-3000:]}")
    last = usage.ru_maxrss * 1024  # since the last reset: the last phase's peak
    ends, phase_peaks = [t for _, t in marks[1:]] + [seconds], [*peaks[1:], last]
    phases = {
        name: {"s": end - at, "peak_rss": peak}
        for (name, at), end, peak in zip(marks, ends, phase_peaks, strict=False)
    }
    return max([last, *peaks]), seconds, phases


def _reset_hwm(pid: int) -> int:
    """The process's peak RSS so far (VmHWM, bytes), then reset to its current RSS; 0 where
    /proc does not tell (then the phases' peaks are missing, the run's is still right)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return hwm
    except (OSError, StopIteration):
        return 0


def synth(config, out: Path, name: str = "11b") -> None:
    """A checkpoint of ``config``, written by the CLI in a child process: a fork of a parent
    that had held the writer's memory would start with that peak in its ru_maxrss."""
    v = config.vision
    cmd = [sys.executable, "-m", "mllama_export", "synth", "--preset", name, "--out", str(out)]
    cmd += ["--text-layers", str(config.text.num_layers), "--vision-layers", str(v.num_layers)]
    if name == "11b":
        cmd += ["--global-layers", str(v.num_global_layers)]
        cmd += ["--cross-layers", ",".join(map(str, config.text.cross_attention_layers))]
    cmd += ["--dtype", "bf16", "--max-shard-size", "5GB"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


BASELINE = """
import sys, torch
from pathlib import Path
from mllama_export.exporter.onnx_export import dims_for, example_inputs
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.checkpoint import load_model
from mllama_export.graphs.family import family_of
ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
model = load_model(ckpt, dtype=torch.bfloat16)
family = family_of(model.config)
DYNAMIC_DIMS = family.part("contract").DYNAMIC_DIMS
options = BuildOptions(model=str(ckpt), out=out, precision="bf16").with_defaults(model.config)
dims = dims_for(model.config, options)
for name, cls in family.part("graph_modules").items():
    graph = cls(model)
    args = example_inputs(graph.INPUTS, model.config, torch.bfloat16)
    shapes = {s.name: {i: dims[d] for i, d in s.dynamic_axes(DYNAMIC_DIMS).items()} for s in graph.INPUTS}
    with torch.inference_mode():
        program = torch.onnx.export(graph, args, dynamic_shapes=shapes, dynamo=True,
            input_names=[s.name for s in graph.INPUTS], opset_version=19)
    program.save(str(out / f"{name}.onnx"), external_data=True)
    del program
"""


CALIBRATE = """
import sys
from mllama_export.engines.runner import Limits
from mllama_export.exporter.calibrate import CALIBRATION_STEPS, calibrate_streamed
from mllama_export.exporter.fp8 import calibration_cases, fp8_layers
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.weights import Checkpoint
ckpt = sys.argv[1]
config = MllamaConfig.from_hf_config(ckpt)
options = BuildOptions(model=ckpt, out="unused", precision="fp8").with_defaults(config)
cases = calibration_cases(config, options, ckpt)
limits = Limits(options.max_batch, options.max_seq_len, options.max_images)
calibrate_streamed(Checkpoint(ckpt, config), "meta", fp8_layers(config, options), cases,
    limits, CALIBRATION_STEPS)
"""


def measure_calibration(layers: int, workdir: Path) -> dict:
    """Peak RSS of the FP8 calibration alone, in a child process."""
    config = geometry(layers)
    ckpt = workdir / f"ckpt-{layers}"
    synth(config, ckpt)
    rss, seconds = run_measured([sys.executable, "-c", CALIBRATE, str(ckpt)])
    shutil.rmtree(ckpt)
    return {
        "text_layers": layers,
        "vision_layers": f"{config.vision.num_layers}+{config.vision.num_global_layers}",
        **weight_bytes(config),
        "peak_rss": rss,
        "seconds": seconds,
        "precision": "fp8 calibration",
    }


def _cases(check: dict) -> int:
    """The check's number of cases: a list of them, or (the FP8 check) their count."""
    cases = check.get("cases", [])
    return cases if isinstance(cases, int) else len(cases)


def vision_layers(config) -> str:
    """Local + global vision layers (Mllama), or the tower's layers."""
    v = config.vision
    return (
        f"{v.num_layers}+{v.num_global_layers}"
        if hasattr(v, "num_global_layers")
        else str(v.num_layers)
    )


def measure(
    layers: int,
    workdir: Path,
    baseline: bool,
    precision: str,
    depth: str,
    name: str = "11b",
    max_seq_len: int | None = None,
) -> dict:
    config = geometry(layers, name)
    ckpt, out = workdir / f"ckpt-{layers}", workdir / f"out-{layers}"
    synth(config, ckpt, name)
    build = [sys.executable, "-m", "mllama_export", "build", "--model", str(ckpt)]
    build += ["--out", str(out), "--precision", precision, "--check-depth", depth, "--force"]
    build += [] if max_seq_len is None else ["--max-seq-len", str(max_seq_len)]
    rss, seconds, phases = run_phased(build)
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["graphs"]["decode"]["check"]
    row = {
        "text_layers": layers,
        "vision_layers": vision_layers(config),
        **weight_bytes(config),
        "peak_rss": rss,
        "seconds": seconds,
        "onnx_bytes": sum(p.stat().st_size for p in (out / "onnx").iterdir()),
        "check": "none" if not check.get("ran") else check.get("depth", "full"),
        "estimate": check.get("memory_estimate_bytes"),
        "cases": {g: _cases(e["check"]) for g, e in manifest["graphs"].items()},
        "precision": precision,
        "phases_s": phases,
    }
    shutil.rmtree(out)
    if baseline:
        out.mkdir()
        script = [sys.executable, "-c", BASELINE, str(ckpt), str(out)]
        row["baseline_rss"], row["baseline_seconds"] = run_measured(script)
        shutil.rmtree(out)
    shutil.rmtree(ckpt)
    return row


def report(rows: list[dict], precision: str) -> None:
    if precision != "bf16":
        report_checked(rows)
        return
    print(
        "text layers  vision  weights GB  1 layer GB  largest GB  peak RSS GB  "
        "vs first  bound GB  ok   time s  baseline RSS GB"
    )
    first = rows[0]["peak_rss"]
    for r in rows:
        bf16 = r.get("precision", "bf16") == "bf16"
        bound = r["layer"] + 2 * GB
        limit = f"{bound / GB:8.2f}  {'yes' if r['peak_rss'] < bound else 'NO':3s}"
        base = f"{r['baseline_rss'] / GB:8.2f}" if "baseline_rss" in r else "       -"
        print(
            f"{r['text_layers']:11d}  {r['vision_layers']:>6s}  {r['total'] / GB:10.2f}  "
            f"{r['layer'] / GB:10.3f}  {r['largest'] / GB:10.3f}  {r['peak_rss'] / GB:11.2f}  "
            f"{r['peak_rss'] / first:7.2f}x  {limit if bf16 else '       -  -  '}  "
            f"{r['seconds']:7.0f}  {base}"
        )
    for r in rows:
        if r.get("phases_s"):
            parts = [
                f"{k} {v['s']:.0f} s, {v['peak_rss'] / GB:.2f} GB" for k, v in r["phases_s"].items()
            ]
            print(f"{r['text_layers']:3d} layers by phase: " + "; ".join(parts))
    spread = max(r["peak_rss"] for r in rows) / min(r["peak_rss"] for r in rows) - 1
    print(f"peak RSS spread across depths: {spread:.1%} (limit 10%)")


def report_checked(rows: list[dict]) -> None:
    """fp16/fp32: the check's depth and cases, its estimate against the measured peak."""
    total = machine_memory()
    print(
        "text layers  vision  weights GB  check    cases v/p/d  estimate GB  peak RSS GB  "
        "estimate/peak  of machine  time s"
    )
    for r in rows:
        depth = "full" if r["check"] == "full" else "reduced" if r["check"] != "none" else "none"
        cases = "/".join(str(n) for n in r["cases"].values())
        est = r["estimate"] or 0
        print(
            f"{r['text_layers']:11d}  {r['vision_layers']:>6s}  {r['total'] / GB:10.2f}  "
            f"{depth:7s}  {cases:>11s}  {est / GB:11.2f}  {r['peak_rss'] / GB:11.2f}  "
            f"{est / r['peak_rss']:13.2f}  {r['peak_rss'] / total:9.0%}  {r['seconds']:6.0f}"
        )
    for r in rows:
        if r["check"] not in ("full", "none"):
            print(f"reduced check of {r['text_layers']} layers: {r['check']}")
            break


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--preset", default="11b", help="any family's preset, e.g. llava-1.5-7b")
    parser.add_argument("--max-seq-len", type=int, default=None, help="build's; default: its own")
    parser.add_argument("--calibration-only", action="store_true", help="fp8: calibrate only")
    parser.add_argument("--baseline-layers", type=int, nargs="*", default=[])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32", "fp8"], default="bf16")
    parser.add_argument("--check-depth", choices=["auto", "full", "reduced"], default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.preset != "11b" and (args.calibration_only or args.precision == "fp8"):
        parser.error("FP8 and --calibration-only measure the 11B preset only")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="export-memory-"))
    try:
        rows = []
        for n in args.layers:
            if args.calibration_only:
                rows.append(measure_calibration(n, workdir))
            else:
                baseline = n in args.baseline_layers
                row = measure(
                    n, workdir, baseline, args.precision, args.check_depth, args.preset,
                    args.max_seq_len,
                )  # fmt: skip
                rows.append(row)
            if args.json:  # row by row: an interrupted run keeps the depths it measured
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(rows, "bf16" if args.calibration_only else args.precision)


if __name__ == "__main__":
    main()
