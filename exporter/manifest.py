"""manifest.json: what was built, from what, for which shapes, and the sha256 of every file."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import signal
from pathlib import Path
from typing import Any

from mllama_export.errors import MllamaExportError

MANIFEST = "manifest.json"
FORMAT = "mllama-export/1"
INCOMPLETE_MARKER = "BUILD-INCOMPLETE"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, INCOMPLETE_MARKER)
    }


def fault_point(name: str) -> None:
    """Test hook for fault injection: MLLAMA_EXPORT_KILL_AT=<name> kills the process here with
    SIGKILL (no cleanup runs), so tests can prove an interrupted build leaves nothing behind."""
    if os.environ.get("MLLAMA_EXPORT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_manifest(folder: Path, content: dict[str, Any]) -> None:
    content = {"format": FORMAT, **content, "files": file_hashes(folder)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    fault_point("manifest")
    tmp.replace(folder / MANIFEST)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MllamaExportError(f"artifact folder {folder} does not exist")
    if (folder / INCOMPLETE_MARKER).exists():
        raise MllamaExportError(
            f"{folder} holds an incomplete build; run `mllama-export build` again to finish it"
        )
    file = folder / MANIFEST
    if not file.is_file():
        raise MllamaExportError(
            f"{folder} has no {MANIFEST}; expected a folder written by `mllama-export build`"
        )
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise MllamaExportError(f"cannot read {file}: {err}") from err
    if manifest.get("format") != FORMAT:
        raise MllamaExportError(
            f"{file} has format {manifest.get('format')!r}; this version reads {FORMAT!r}"
        )
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file listed must exist with its recorded sha256, and every ONNX file's external
    data must stay inside the folder, before anything is loaded."""
    root = folder.resolve()
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.resolve().is_relative_to(root):
            raise MllamaExportError(f"{folder}: manifest entry {name} points outside the folder")
        if not path.is_file():
            raise MllamaExportError(f"{folder}: {name} is listed in the manifest but missing")
        if sha256(path) != expected:
            raise MllamaExportError(
                f"{folder}: {name} does not match the sha256 in the manifest (changed or "
                "corrupted since the build); rebuild the artifacts"
            )


def check_external_data(folder: Path, onnx_file: Path) -> None:
    """An ONNX file names its external data by relative path; one that escapes the artifact
    folder (../../etc/passwd, an absolute path) could read anything: refuse it."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    root = folder.resolve()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                target = (onnx_file.parent / entry.value).resolve()
                if not target.is_relative_to(root):
                    raise MllamaExportError(
                        f"{onnx_file.name}: external data of {tensor.name} points outside "
                        f"{folder} ({entry.value}); refusing to load it"
                    )
