"""The streaming export: traced on the meta device, weights written one block at a time,
text weights shared by prefill and decode (the check's plan: tests/test_checkplan.py)."""

from __future__ import annotations

import json
import weakref

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from mllama_export.cli import main
from mllama_export.errors import MllamaExportError
from mllama_export.exporter import checkplan
from mllama_export.exporter.options import BuildOptions
from mllama_export.exporter.streaming import StreamingExport
from mllama_export.exporter.weightfile import ALIGNMENT, Source, WeightFile, graph_names
from mllama_export.graphs import checkpoint as weights
from mllama_export.graphs.config import preset
from mllama_export.graphs.model import GRAPH_MODULES
from mllama_export.graphs.weights import Checkpoint


def external(path) -> dict[str, tuple[str, int, int]]:
    """{initializer: (file, offset, length)} of one ONNX file's external weights."""
    found = {}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if info:
            found[t.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    return found


def test_prefill_and_decode_point_at_one_copy_of_the_text_weights(ort_artifacts):
    onnx_dir = ort_artifacts / "onnx"
    prefill, decode = external(onnx_dir / "prefill.onnx"), external(onnx_dir / "decode.onnx")
    assert {loc for loc, _, _ in prefill.values()} == {"text.onnx.data"}
    assert set(decode.values()) <= set(prefill.values())  # same bytes, same places
    graphs = json.loads((ort_artifacts / "manifest.json").read_text())["graphs"]
    assert graphs["decode"]["weight_bytes_written"] == 0
    assert graphs["prefill"]["weight_bytes_written"] > 0
    size = (onnx_dir / "text.onnx.data").stat().st_size
    assert size >= sum(length for _, _, length in prefill.values())
    assert {p.name for p in onnx_dir.iterdir()} == {
        "vision.onnx",
        "vision.onnx.data",
        "prefill.onnx",
        "decode.onnx",
        "text.onnx.data",
    }


def _reference_tensors(model, graph) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    found = {}
    for path, ours in graph_names(graph, model).items():
        found[path] = named[ours]
        found[f"{path}.transposed"] = named[ours].t() if named[ours].dim() == 2 else None
    return found


def test_streamed_weights_equal_the_loaded_model_bit_for_bit_in_small_blocks(
    tiny_dir, tiny_model_meta, tmp_path, monkeypatch
):
    """Blocks of 1000 bytes: most tensors are written in many pieces, transposed ones too."""
    monkeypatch.setattr(weights, "BLOCK_BYTES", 1000)
    checkpoint = Checkpoint(tiny_dir, tiny_model_meta.config)
    StreamingExport(checkpoint, BuildOptions(model="tiny", out=tmp_path)).export_all(tmp_path)
    for name, graph_cls in GRAPH_MODULES.items():
        expected = _reference_tensors(tiny_model_meta, graph_cls(tiny_model_meta))
        model = onnx.load(str(tmp_path / f"{name}.onnx"))  # with its external data
        for t in model.graph.initializer:
            if t.name in expected:
                got = onnx.numpy_helper.to_array(t)
                want = expected[t.name].detach().numpy()
                assert got.shape == want.shape and np.array_equal(got, want), t.name


def test_the_export_holds_one_checkpoint_block_at_a_time(tiny_dir, tmp_path, monkeypatch):
    """Every block read from the checkpoint is gone before the next large one is read, and
    each large tensor is read once although prefill and decode both use it."""
    monkeypatch.setattr(weights, "BLOCK_BYTES", 4096)
    checkpoint = Checkpoint(tiny_dir, preset("tiny"))
    live: set[int] = set()
    peak, reads = [0], {}
    blocks = checkpoint.blocks

    def watched(name, dtype):
        reads[name] = reads.get(name, 0) + 1
        for block in blocks(name, dtype):
            live.add(id(block))
            weakref.finalize(block, live.discard, id(block))
            peak[0] = max(peak[0], len(live))
            yield block
            del block

    monkeypatch.setattr(checkpoint, "blocks", watched)
    StreamingExport(checkpoint, BuildOptions(model="tiny", out=tmp_path)).export_all(tmp_path)
    assert peak[0] == 1
    # the exporter's optimizer reads tensors below 8192 elements to fold them, the writer once
    large = [n for n, t in checkpoint.tensors.items() if np.prod(t.shape) > 8192]
    assert large and all(reads[n] == 1 for n in large), {n: reads.get(n) for n in large}


def test_a_weight_file_aligns_large_tensors_and_writes_each_key_once(tmp_path):
    big = Source.of("big", lambda: torch.ones(512, 1024), torch.float32, (512, 1024))  # 2 MiB
    small = Source.of("small", lambda: torch.arange(100.0), torch.float32, (100,))
    from mllama_export.exporter.weightfile import SourceTensor

    with WeightFile(tmp_path / "w.data") as data:
        first = data._put(SourceTensor(small, "s"))
        at, length = data._put(SourceTensor(big, "b"))
        again = data._put(SourceTensor(big, "b2"))
    assert first == (0, 400) and at % ALIGNMENT == 0 and length == 2 << 20
    assert again == (at, length) and data.bytes_written == 400 + length
    assert (tmp_path / "w.data").stat().st_size == at + length


def test_fp8_is_refused_before_any_work_only_where_one_layer_does_not_fit(tmp_path, monkeypatch):
    # 11B's largest unit (the float32 embedding, 2.1 GB) and the headroom: 4.2 GB at any depth
    assert checkplan.calibration_memory(preset("11b")) == pytest.approx(4.25e9, rel=0.01)
    assert checkplan.calibration_memory(preset("tiny")) < 2.2e9
    monkeypatch.setattr(checkplan, "available_memory", lambda: 1 << 20)
    out = tmp_path / "fp8"
    result = CliRunner().invoke(
        main, ["build", "--model", "tiny", "--out", str(out), "--precision", "fp8"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "calibrates one layer at a time in float32" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fp8_options_are_checked():
    for bad, message in (
        ({"precision": "fp16", "fp8_weights": "per-channel"}, "fp8-weights with precision fp16"),
        ({"precision": "fp8", "fp8_weights": "per-row"}, "fp8-weights 'per-row'"),
    ):
        with pytest.raises(MllamaExportError, match=message):
            BuildOptions(model="tiny", out="x", **bad).check(preset("tiny"))
    # a reduced-depth check is an FP8 option like any other now (tests/test_fp8_check.py)
    BuildOptions(model="tiny", out="x", precision="fp8", check_depth="reduced").check(
        preset("tiny")
    )
