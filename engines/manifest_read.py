"""Reading and checking an artifact folder's manifest.json, before any graph is opened.

The build writes the manifest (exporter/manifest.py); the runner, inspect and the gate read it
here, so loading artifacts never imports the exporter.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mllama_export.errors import MllamaExportError
from mllama_export.graphs import strict
from mllama_export.graphs.family import family_of_config
from mllama_export.graphs.progress import bar

MANIFEST = "manifest.json"
FORMAT = "mllama-export/1"
INCOMPLETE_MARKER = "BUILD-INCOMPLETE"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if folder.is_file():
        raise MllamaExportError(
            f"{folder} is a file; expected an artifact folder written by `mllama-export build`"
        )
    if not folder.is_dir():
        raise MllamaExportError(f"artifact folder {folder} does not exist")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise MllamaExportError(
            f"cannot read the artifact folder {folder}: permission denied; expected a folder "
            "this user may read"
        )
    if (folder / INCOMPLETE_MARKER).exists():
        raise MllamaExportError(
            f"{folder} holds an incomplete build; run `mllama-export build` again to finish it"
        )
    file = folder / MANIFEST
    if not file.is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise MllamaExportError(
            f"{folder} has no {MANIFEST}; expected a folder written by `mllama-export build` "
            f"(it holds: {present})"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MllamaExportError(
            f"cannot read {file}: {err}; expected the JSON manifest `mllama-export build` writes"
        ) from err
    if not isinstance(manifest, dict):
        raise MllamaExportError(
            f"{file} holds a JSON {type(manifest).__name__}; expected the JSON object "
            "`mllama-export build` writes"
        )
    _check_format(file, manifest)
    _check_shape(file, manifest)
    return manifest


def _check_format(file: Path, manifest: dict[str, Any]) -> None:
    found = manifest.get("format")
    if found == FORMAT:
        return
    hint = "it was not written by `mllama-export build`"
    name, _, number = str(found).rpartition("/")
    ours = int(FORMAT.rpartition("/")[2])
    if name == "mllama-export" and number.isdigit():
        writer = (manifest.get("versions") or {}).get("mllama-export") or "another version"
        newer = int(number) > ours
        hint = (
            f"it was written by mllama-export {writer}, "
            + ("a newer version; upgrade mllama-export" if newer else "an older version")
            + " or rebuild the artifacts with this one"
        )
    raise MllamaExportError(
        f"{file} has format {found!r}; this version of mllama-export reads {FORMAT!r} ({hint})"
    )


def _sha256s(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise strict.Wrong("an object mapping file names to sha256 strings")
    return value


_LIMIT_INT = strict.integer(floats=False)
_LIMIT_KEYS = ("max_batch", "max_seq_len", "max_images")
# The keys and types the runner and inspect read; other keys are the build's record, not checked.
_TOP = (
    strict.Key("model", strict.obj),
    strict.Key("precision", strict.text),
    strict.Key("io_dtype", strict.text),
    strict.Key("limits", strict.obj),
    strict.Key("graphs", strict.obj),
    strict.Key("files", _sha256s),
)
_MODEL = (strict.Key("config", strict.obj, about="the checkpoint's config.json"),)
_LIMITS = tuple(strict.Key(k, _LIMIT_INT) for k in _LIMIT_KEYS)
_GRAPH = (strict.Key("file", strict.text, about="a path like onnx/vision.onnx"),)


def _check_shape(file: Path, m: dict[str, Any]) -> None:
    """The keys and types the runner and inspect read, so a hand-edited manifest fails here
    with a message instead of a KeyError deep inside."""
    try:
        top = strict.read("it", m, _TOP, others=True, prefix="")
        strict.read("model", top["model"], _MODEL, others=True)
        strict.read("limits", top["limits"], _LIMITS)
        # the graphs of the family the manifest's config.json names
        names = list(family_of_config(top["model"]["config"], "the manifest's model config").graphs)
        keys = tuple(strict.Key(name, strict.obj) for name in names)
        graphs = strict.read("graphs", top["graphs"], keys, others=True)
        for name in names:
            strict.read(f"graphs.{name}", graphs[name], _GRAPH, others=True)
    except MllamaExportError as err:
        raise MllamaExportError(
            f"{file} is not a valid mllama-export manifest: {err}; rebuild "
            "the artifacts with `mllama-export build`"
        ) from None


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file listed must exist with its recorded sha256, and every ONNX file's external
    data must stay inside the folder, before anything is loaded."""
    problems = file_problems(folder, manifest, stop_at_first=True)
    if problems:
        name, problem = problems[0]
        raise MllamaExportError(f"{folder}: {name} {problem}; rebuild the artifacts")


def file_problems(
    folder: Path, manifest: dict[str, Any], stop_at_first: bool = False
) -> list[tuple[str, str]]:
    """(file, what is wrong with it) for each file of the manifest that is missing, outside
    the folder or not its recorded sha256; hashed with a progress bar (bytes)."""
    root = folder.resolve()
    entries = list(manifest["files"].items())
    sizes = {name: _size(folder / name) for name, _ in entries}
    problems = []
    for name, expected in bar(entries, sum(sizes.values()), "checking sha256", "B",
                              lambda e: sizes[e[0]]):  # fmt: skip
        path = folder / name
        if not path.resolve().is_relative_to(root):
            problems.append((name, "is a manifest entry that points outside the folder"))
        elif not path.is_file():
            problems.append(
                (name, "is listed in the manifest but missing; expected every file the build wrote")
            )
        elif sha256(path) != expected:
            problems.append(
                (
                    name,
                    "does not match the sha256 in the manifest (changed or corrupted since the build)",
                )
            )
        if problems and stop_at_first:
            break
    return problems


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


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
