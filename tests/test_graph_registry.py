"""The graph registry (graphs/contract.py GRAPHS) against the modules and the exported files,
and the refusal of a graph module whose forward does not take its inputs in contract order."""

from __future__ import annotations

import inspect
import json

import onnx
import pytest
import torch

from mllama_export.engines.backend import TorchBackend
from mllama_export.engines.profiles import engine_graphs
from mllama_export.errors import MllamaExportError
from mllama_export.exporter import verify
from mllama_export.exporter.onnx_export import example_inputs, export_graph
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.contract import DYNAMIC_DIMS, GRAPH_NAMES, GRAPHS, static_dims
from mllama_export.graphs.model import GRAPH_MODULES, PrefillGraph
from mllama_export.graphs.spec import check_forward

SIZES = {"batch": 2, "num_images": 1, "sequence": 6, "num_logits": 2}


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_each_graph_modules_forward_takes_its_declared_inputs_in_order(name):
    spec, cls = GRAPHS[name], GRAPH_MODULES[name]
    params = list(inspect.signature(cls.forward).parameters)
    assert params[0] == "self"
    assert tuple(params[1:]) == spec.input_names
    assert cls.INPUTS is spec.inputs and cls.OUTPUTS is spec.outputs
    assert cls.SPEC is spec


def test_the_registry_is_coherent(tiny_model):
    assert list(GRAPH_MODULES) == list(GRAPHS) == list(GRAPH_NAMES)
    assert GRAPH_NAMES == ("vision", "prefill", "decode")
    known = set(DYNAMIC_DIMS) | set(static_dims(tiny_model.config))
    for spec in GRAPHS.values():
        assert set(spec.dims) <= known, spec.name
        assert spec.shared_engine in (None, *GRAPHS)
    # prefill and decode share one text weight file; vision has its own
    assert [g.shares_text_weights for g in GRAPHS.values()] == [False, True, True]
    assert engine_graphs("split") == GRAPH_NAMES
    assert engine_graphs("shared") == ("vision", "decode")


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_the_exported_files_are_the_registrys(ort_artifacts, tiny_model):
    manifest = json.loads((ort_artifacts / "manifest.json").read_text())
    assert list(manifest["graphs"]) == list(GRAPH_NAMES)
    static = static_dims(tiny_model.config)
    for name, spec in GRAPHS.items():
        entry = manifest["graphs"][name]
        assert entry["weights"] == f"onnx/{spec.data_file}"
        model = onnx.load(str(ort_artifacts / entry["file"]), load_external_data=False)
        assert tuple(i.name for i in model.graph.input) == spec.input_names
        assert tuple(o.name for o in model.graph.output) == spec.output_names
        values, specs = [*model.graph.input, *model.graph.output], [*spec.inputs, *spec.outputs]
        for value, s in zip(values, specs, strict=True):
            assert _dims(value) == [d if d in DYNAMIC_DIMS else static[d] for d in s.dims]
        assert [t["name"] for t in entry["inputs"]] == list(spec.input_names)
        assert [t["name"] for t in entry["outputs"]] == list(spec.output_names)


class SwappedPrefill(PrefillGraph):
    """A prefill graph whose forward declares position_ids before input_ids, its body using
    each name as meant: both are [batch, sequence] int64, so nothing downstream of a
    positional call notices."""

    def forward(
        self,
        position_ids,
        input_ids,
        attention_mask,
        cross_attention_mask,
        cross_key,
        cross_value,
        logit_positions,
    ):
        return super().forward(
            input_ids,
            position_ids,
            attention_mask,
            cross_attention_mask,
            cross_key,
            cross_value,
            logit_positions,
        )


def _feed(model) -> dict[str, torch.Tensor]:
    args = example_inputs(PrefillGraph.INPUTS, model.config, torch.float32, SIZES, seed=3)
    return {s.name: a for s, a in zip(PrefillGraph.INPUTS, args, strict=True)}


def test_a_swapped_forward_goes_unnoticed_by_position_but_not_by_name(tiny_model):
    """Why binding by position is not enough: the planted module computes different logits
    when fed in contract order, silently; fed by name, it computes the right ones."""
    feed = _feed(tiny_model)
    with torch.inference_mode():
        right = PrefillGraph(tiny_model)(**feed)
        by_name = SwappedPrefill(tiny_model)(**feed)
        by_position = SwappedPrefill(tiny_model)(*feed.values())
    for a, b in zip(right, by_name, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(right[0], by_position[0])


def test_a_swapped_forward_is_refused_by_the_torch_backend(tiny_model):
    with pytest.raises(MllamaExportError, match=r"takes \['position_ids', 'input_ids'"):
        TorchBackend(SwappedPrefill(tiny_model))
    check_forward(PrefillGraph(tiny_model), PrefillGraph.INPUTS)  # the real one passes


def test_a_swapped_forward_is_refused_by_export_before_any_file(tiny_model_meta, tmp_path):
    """Export names the ONNX inputs after the contract by position: the swapped module would
    export a graph whose input_ids feed its rope, and ONNX Runtime would agree with it."""
    options = BuildOptions(model="tiny", out=tmp_path / "out")
    graph = SwappedPrefill(tiny_model_meta)
    with pytest.raises(MllamaExportError, match="in that order"):
        export_graph(graph, tiny_model_meta.config, options, tmp_path / "prefill.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_swapped_forward_is_refused_by_the_builds_check(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setattr(verify, "graph_modules", lambda config: {"prefill": SwappedPrefill})
    options = BuildOptions(model="tiny", out=tmp_path)
    cases = {"prefill": ((1, SIZES),)}
    reference = verify.Reference(model=tiny_model)
    with pytest.raises(MllamaExportError, match="SwappedPrefill.forward takes"):
        verify.reference_outputs(reference, tiny_model.config, options, cases)
