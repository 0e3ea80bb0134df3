"""A strongly typed engine runs every op in the type the ONNX says: the 16-bit graphs must
carry float32 where it is needed and a masked-score constant that no type turns into -inf.
Left padding makes whole rows of the prefill's self-attention masked; they must stay finite."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from mllama_export.engines.backend import TorchBackend
from mllama_export.engines.inputs import prompt_feed
from mllama_export.engines.onnxrt import OnnxRuntimeBackend
from mllama_export.engines.runner import Limits, Runner
from mllama_export.engines.steps import logit_positions
from mllama_export.exporter.onnx_export import export_graph
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.layers import MASKED_SCORE
from mllama_export.graphs.model import PrefillGraph
from mllama_export.graphs.weights import load_model

FP16_MAX = float(np.finfo(np.float16).max)


@pytest.fixture(scope="module")
def fp16_prefill(tiny_dir, tmp_path_factory):
    model = load_model(tiny_dir, "meta", torch.float16)
    path = tmp_path_factory.mktemp("fp16") / "prefill.onnx"
    options = BuildOptions(model=str(tiny_dir), out=path.parent, precision="fp16", max_seq_len=64)
    export_graph(PrefillGraph(model), model.config, options, path)
    return path, model.config


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input)}
    types.update({i.name: i.data_type for i in graph.initializer})
    return types


def test_fp16_graph_keeps_norms_and_softmax_in_float32(fp16_prefill):
    path, _ = fp16_prefill
    model = onnx.load(str(path), load_external_data=False)
    types = _types(model)
    ops = Counter(
        (n.op_type, onnx.TensorProto.DataType.Name(types.get(n.input[0], 0)))
        for n in model.graph.node
        if n.input
    )
    assert ops[("Softmax", "FLOAT")] > 0 and ops[("Softmax", "FLOAT16")] == 0
    assert ops[("ReduceMean", "FLOAT")] > 0 and ops[("ReduceMean", "FLOAT16")] == 0  # RMSNorm
    assert ops[("MatMul", "FLOAT16")] > 0  # the GEMMs in 16 bits
    # every masked score is a finite float16 value, whatever type a builder keeps scores in
    constants = {
        i.name: numpy_helper.to_array(i) for i in model.graph.initializer if not i.external_data
    }
    wheres = [n for n in model.graph.node if n.op_type == "Where"]
    masks = [constants[n.input[1]] for n in wheres if n.input[1] in constants]
    assert masks and all(m.size == 1 and float(m) == MASKED_SCORE for m in masks)
    assert abs(MASKED_SCORE) <= FP16_MAX and np.isfinite(np.float16(MASKED_SCORE))


def test_fully_masked_left_padded_rows_stay_finite_at_fp16(fp16_prefill, tiny_model_meta):
    path, config = fp16_prefill
    runner = Runner(config, {}, Limits(4, 64, 1))  # its feed-building code
    prompts = [[500, 20, 21, 22, 23, 24], [500, 25]]  # row 1: four pads, fully masked rows
    feed = prompt_feed(runner.config, prompts, None)
    feed["logit_positions"] = logit_positions(6, None)  # judge every position, pads too
    t, v = config.text, config.vision
    shape = (
        len(t.cross_attention_layers),
        2,
        t.num_kv_heads,
        v.max_num_tiles * v.num_patches,
        t.head_dim,
    )
    feed["cross_key"] = feed["cross_value"] = np.zeros(shape, np.float16)
    out = OnnxRuntimeBackend(path, PrefillGraph.INPUTS, PrefillGraph.OUTPUTS).infer(feed)
    for name, value in out.items():
        assert np.isfinite(value.astype(np.float32)).all(), name
    assert out["logits"].shape == (2, 6, t.vocab_size)
    # the real positions agree with the float32 PyTorch graph
    ref_feed = {k: (x.astype(np.float32) if x.dtype == np.float16 else x) for k, x in feed.items()}
    ref = TorchBackend(PrefillGraph(tiny_model_meta)).infer(ref_feed)
    real = feed["attention_mask"] != 0
    got, want = out["logits"][real].astype(np.float64), ref["logits"][real].astype(np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-2
    # and a pad row attends nowhere: it averages, as the float32 graph does
    np.testing.assert_allclose(out["logits"][1, 0], ref["logits"][1, 0], rtol=0.05, atol=0.05)
