"""The path of `build`'s options through the modules (issue 17): which files the calls that
carry them enter, and how often the path comes back to each.

Runs one tiny build per precision under ``sys.setprofile`` and records every Python call one
of whose arguments carries the user's request: the BuildOptions object itself, or a BuildPlan
holding it (not as ``self``: their own methods are not the path). Consecutive calls in one file
count as one visit, so "visits" is how often the path enters that file. Usage: python benchmarks/options_path.py [fp32|fp8 ...] (default both).
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

from mllama_export.exporter import build as build_module
from mllama_export.exporter.options import BuildOptions

ROOT = Path(build_module.__file__).resolve().parents[1]


def carries(value, options) -> bool:
    if value is options:
        return True
    return type(value).__name__ == "BuildPlan" and value.options is options


def trace(precision: str) -> list[tuple[str, str]]:
    out = Path(tempfile.mkdtemp()) / "tiny"
    # max_seq_len given, so that the plan carries this very object (with_defaults keeps it)
    options = BuildOptions(
        model="tiny", out=out, precision=precision, engines="skip", max_seq_len=512
    )
    calls: list[tuple[str, str]] = []

    def profile(frame, event, _arg):
        if event != "call":
            return
        code = frame.f_code
        if not code.co_filename.startswith(str(ROOT)):
            return
        # the request's own methods (BuildOptions.dtype, BuildPlan.config) are not the path
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        names = [n for n in names if n != "self"]
        if any(carries(frame.f_locals.get(n), options) for n in names):
            file = Path(code.co_filename).resolve()
            calls.append((str(file.relative_to(ROOT)), code.co_name))

    sys.setprofile(profile)
    try:
        build_module.build(options)
    finally:
        sys.setprofile(None)
    return calls


def report(precision: str) -> None:
    calls = trace(precision)
    visits: list[str] = []
    for file, _ in calls:
        if not visits or visits[-1] != file:
            visits.append(file)
    counts = Counter(visits)
    print(f"## {precision}: {len(calls)} calls carrying the options, {len(visits)} file visits")
    print("path: " + " -> ".join(visits))
    for file, n in counts.most_common():
        functions = sorted({f for f_, f in calls if f_ == file})
        print(f"  {file}: {n} visit(s); {', '.join(functions)}")


if __name__ == "__main__":
    for precision in sys.argv[1:] or ["fp32", "fp8"]:
        report(precision)
