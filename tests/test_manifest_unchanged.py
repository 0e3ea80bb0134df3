"""A tiny build's manifest, field by field, against one written before the architecture
change of issue 17 (tests/golden/): the refactor moved code, not what a build records.

What legitimately differs from run to run is dropped first: hashes, versions, times, the
folders of this run, floating-point check figures (their keys stay) and TensorRT's reason
(it quotes this machine's import error). To renew the golden files after a deliberate
change of the manifest, run this file with MLLAMA_EXPORT_WRITE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
VOLATILE = {"built_at", "versions", "export_s", "reason"}
PATHS = {
    ("build_options", "out"),
    ("build_options", "model"),
    ("model", "source"),
    ("model", "checkpoint"),
}


def normalized(manifest: dict, path: tuple[str, ...] = ()) -> object:
    if isinstance(manifest, dict):
        out = {}
        for key, value in manifest.items():
            # a preset's checkpoint is None in every run: kept, so that it stays None
            if key in VOLATILE or (path + (key,) in PATHS and value is not None):
                out[key] = "<varies>"
            elif path == ("files",):
                out[key] = "<sha256>"
            elif key == "rel_l2" or key.endswith("_rel_l2_max"):
                # measured errors: the FP8 GEMMs' follow ONNX Runtime's kernels and threads
                out[key] = "<figure>"
            else:
                out[key] = normalized(value, path + (key,))
        return out
    if isinstance(manifest, list):
        return [normalized(v, path) for v in manifest]
    return manifest


def _read(folder: Path) -> object:
    return normalized(json.loads((folder / "manifest.json").read_text()))


def flat(tree: object, path: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{path}.{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in flat(sub, f"{path}[{i}]").items()}
    return {path: tree}


def differences(got: object, expected: object) -> list[str]:
    # Calibrated maxima and check figures are floats whose last bits may follow the BLAS's
    # thread count; a field that moved, appeared or vanished is what this test is for.
    got, expected = flat(got), flat(expected)
    lines = [f"missing {k}" for k in expected.keys() - got.keys()]
    lines += [f"new {k} = {got[k]!r}" for k in got.keys() - expected.keys()]
    for key in got.keys() & expected.keys():
        a, b = got[key], expected[key]
        same = a == pytest.approx(b, rel=1e-5) if isinstance(b, float) else a == b
        if not same:
            lines.append(f"{key}: {a!r}, was {b!r}")
    return sorted(lines)


@pytest.mark.parametrize(
    "name, fixture", [("fp32-hf-checkpoint", "ort_artifacts"), ("fp8-preset", "fp8_dir")]
)
def test_a_tiny_build_records_what_it_recorded_before(name, fixture, request):
    folder = request.getfixturevalue(fixture)
    golden = GOLDEN / f"manifest-{name}.json"
    if os.environ.get("MLLAMA_EXPORT_WRITE_GOLDEN") == "1":
        golden.write_text(json.dumps(_read(folder), indent=1, sort_keys=True) + "\n")
    assert differences(_read(folder), json.loads(golden.read_text())) == []


def test_a_moved_renamed_or_changed_field_is_reported():
    before = {"a": {"x": 1.0, "n": [1, 2]}, "b": "kept"}
    after = {"a": {"x": 1.0 + 1e-9, "n": [1, 3]}, "c": "kept"}
    assert differences(after, before) == [".a.n[1]: 3, was 2", "missing .b", "new .c = 'kept'"]
