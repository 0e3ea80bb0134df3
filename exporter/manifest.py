"""Writing manifest.json: what was built, from what, for which shapes, and the sha256 of every
file. Reading and checking it is engines/manifest_read.py, which the runner uses too."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
from pathlib import Path
from typing import Any

from mllama_export.engines.manifest_read import FORMAT, INCOMPLETE_MARKER, MANIFEST, sha256


def versions() -> dict[str, str | None]:
    found = {}
    for dist in (
        "mllama-export",
        "torch",
        "onnx",
        "onnxruntime-gpu",
        "onnxruntime",
        "transformers",
    ):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def file_hashes(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file; `known` hashes are taken as they are (files the caller knows
    unchanged: the engine stage does not rehash 20 GB of ONNX weights per engine)."""
    known = known or {}
    hashes = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, INCOMPLETE_MARKER, MANIFEST + ".tmp"):
            name = str(p.relative_to(folder))
            hashes[name] = known.get(name) or sha256(p)
    return hashes


def fault_point(name: str) -> None:
    """Test hook for fault injection: MLLAMA_EXPORT_KILL_AT=<name> kills the process here with
    SIGKILL (no cleanup runs), so tests can prove an interrupted build leaves nothing behind."""
    if os.environ.get("MLLAMA_EXPORT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_manifest(
    folder: Path, content: dict[str, Any], known: dict[str, str] | None = None
) -> None:
    content = {"format": FORMAT, **content, "files": file_hashes(folder, known)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    fault_point("manifest")
    tmp.replace(folder / MANIFEST)


def summarize_check(check: dict, detail: bool = False) -> str:
    """One line on a graph's check against PyTorch, from its manifest entry, with its limit:
    `build`'s output, or with ``detail`` (the depth in full) `inspect`'s."""
    if not check.get("ran"):
        reason = check.get("reason", "not recorded")
        return f"no ({reason})" if detail else reason
    worst = max((m["rel_l2"] for m in check.get("outputs", {}).values()), default=0.0)
    depth = check.get("depth", "full")
    reduced = "" if depth == "full" else ", on a reduced copy"
    if "gemm_rel_l2_max" in check:
        # FP8 graphs: every GEMM output shared with PyTorch (exporter/fp8_check.py)
        between = max(worst, check.get("gemm_inputs_rel_l2_max", 0.0))
        line = (
            f"GEMMs rel L2 {check['gemm_rel_l2_max']:.1e} (limit {check['gemm_limit_rel_l2']}), "
            f"between them {between:.1e} (limit {check['limit_rel_l2']})"
        )
        if detail:
            return f"{line}; {check.get('fp8_gemms', '?')} of {check.get('gemms', '?')} GEMMs FP8, {depth}"
        return line + reduced
    figure = f"rel L2 {worst:.1e} (limit {check.get('limit_rel_l2')})"
    if detail:
        return f"{figure}, {depth}"
    return figure + reduced
