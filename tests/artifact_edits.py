"""Deliberate edits of built artifacts for the gate's tests (tests/test_gate.py,
tests/test_llava_gate.py): copies, one initializer rewritten, and a fresh manifest.

Changing a file breaks its sha256 in the manifest, and the gate refuses such a folder (exit 2
from the CLI): that is the feature that stops a gate from judging files other than the ones
built. To judge a deliberately perturbed copy, :func:`rehash` re-hashes it with
exporter.manifest.write_manifest, as a build would have.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx

from mllama_export.engines.manifest_read import read_manifest
from mllama_export.exporter.manifest import write_manifest


def copy_artifacts(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def rehash(folder: Path) -> None:
    """A fresh manifest for a deliberately modified copy (what a build would have written)."""
    manifest = read_manifest(folder)
    del manifest["format"], manifest["files"]
    write_manifest(folder, manifest)


def perturb(folder: Path, graph: str, name: str, change, only_this_graph=False) -> np.ndarray:
    """Rewrites one external initializer of one graph in place; returns the old values.

    Prefill and decode share their weights in text.onnx.data: a rewrite in place changes
    both. ``only_this_graph`` appends the changed copy to the file instead and points only
    ``graph`` at it.
    """
    path = folder / "onnx" / f"{graph}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name == name)
    info = {e.key: e.value for e in init.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    with (folder / "onnx" / info["location"]).open("r+b") as f:
        f.seek(int(info.get("offset", 0)))
        old = np.frombuffer(f.read(int(info["length"])), dtype).copy()
        f.seek(0 if only_this_graph else int(info.get("offset", 0)), 2 if only_this_graph else 0)
        offset = f.tell()
        f.write(change(old).astype(dtype).tobytes())
    if only_this_graph:
        kept = [(e.key, e.value) for e in init.external_data if e.key != "offset"]
        del init.external_data[:]
        for key, value in [*kept, ("offset", str(offset))]:
            init.external_data.add(key=key, value=value)
        onnx.save(model, str(path))
    return old
