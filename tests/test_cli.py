"""The command line as a user meets it: help, outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from mllama_export.cli import main
from mllama_export.graphs.weights import load_model

COMMANDS = ["synth", "build", "engines", "run", "inspect", "plan"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_explained(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    options = [p for p in main.commands[command].params if p.param_type_name == "option"]
    for option in options:
        assert option.help, f"{command} {option.opts} has no help"
        assert option.opts[0] in result.output


def test_run_json_gives_tokens_text_and_timings(ort_artifacts, tmp_path):
    result = invoke(
        "run", ort_artifacts, "--token-ids", "500,20,21", "--max-new-tokens", 5, "--json"
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert len(out["token_ids"]) == 5 and isinstance(out["text"], str)
    assert {"prefill_s", "decode_s", "total_s"} <= set(out["timings"])


def test_run_with_an_image_and_a_prompt_streams_text(ort_artifacts):
    result = invoke(
        "run",
        ort_artifacts,
        "--prompt",
        "What is it?",
        "--image",
        "docs/example.png",
        "--max-new-tokens",
        4,
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_inspect_shows_the_contract(ort_artifacts):
    result = invoke("inspect", ort_artifacts)
    assert result.exit_code == 0
    assert (
        "cross_key" in result.output and "image_tokens" in result.output and "hf" in result.output
    )


def test_plan_prints_the_11b_roofline():
    result = invoke(
        "plan", "--model", "11b", "--precision", "bf16", "--max-batch", 1, "--max-seq-len", 8192,
        "--max-images", 1,
    )  # fmt: skip
    assert result.exit_code == 0 and "18.58 GB" in result.output


def test_synth_writes_a_loadable_sharded_checkpoint(tmp_path):
    result = invoke("synth", "--preset", "tiny", "--out", tmp_path / "c", "--shards", 2)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file()


def test_synth_with_fewer_layers_writes_that_model(tmp_path):
    out = tmp_path / "short"
    result = invoke(
        "synth", "--out", out, "--text-layers", 3, "--dtype", "bf16", "--max-shard-size", "200KB"
    )
    assert result.exit_code == 0, result.output
    # 4 vision and 2 global layers scale with 3 of 6 text layers to 2 and 1.
    assert "3 text layers (1 cross-attention), 2 vision + 1 global" in result.output
    model = load_model(out)
    t, v = model.config.text, model.config.vision
    assert (t.num_layers, t.cross_attention_layers) == (3, (1,))
    assert (v.num_layers, v.num_global_layers) == (2, 1)
    assert (len(model.text.layers), len(model.vision.transformer.layers)) == (3, 2)
    assert len(model.vision.global_transformer.layers) == 1
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "{missing}", "--prompt", "x"], "does not exist"),
        (
            ["run", "{art}", "--prompt", "x", "--token-ids", "1"],
            "exactly one of --prompt and --token-ids",
        ),
        (["run", "{art}", "--token-ids", "1,x"], "expected integers"),
        (["run", "{art}", "--token-ids", "500,1", "--max-new-tokens", "100000"], "built for 512"),
        (["run", "{art}", "--prompt", "x", "--top-p", "0"], "invalid sampling"),
        (["run", "{art}", "--prompt", "x", "--backend", "tensorrt"], "no TensorRT engines"),
        (
            ["build", "--model", "nowhere", "--out", "{tmp}/o"],
            "is neither a checkpoint folder, a preset",
        ),
        (["build", "--model", "tiny", "--out", "{art}"], "already exists"),
        (["build", "--model", "tiny", "--out", "{tmp}/o", "--max-batch", "0"], "max-batch 0"),
        (["synth", "--out", "{art}"], "not an empty folder"),
        (["synth", "--out", "{tmp}/o", "--max-shard-size", "2XB"], "--max-shard-size '2XB'"),
        (["synth", "--out", "{tmp}/o", "--max-shard-size", "0"], "expected a positive size"),
        (
            ["synth", "--out", "{tmp}/o", "--shards", "2", "--max-shard-size", "1MB"],
            "one or the other",
        ),
        (["synth", "--out", "{tmp}/o", "--text-layers", "7"], "between 1 and the original 6"),
        (["synth", "--out", "{tmp}/o", "--text-layers", "1"], "no cross-attention layer"),
        (["synth", "--out", "{tmp}/o", "--cross-layers", "1,x"], "comma-separated"),
        (["plan", "--model", "nowhere"], "nowhere"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(args, fragment, ort_artifacts, tmp_path):
    subst = {
        "{missing}": str(tmp_path / "missing"),
        "{art}": str(ort_artifacts),
        "{tmp}": str(tmp_path),
    }
    for key, value in subst.items():
        args = [a.replace(key, value) for a in args]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["plan", "--model", "11b"], ["plan", "--model", "nope"]])
def test_the_cli_in_process_leaves_the_logger_as_it_found_it(args, caplog):
    # A command quiets the host's logging while it runs; after it, a host (a test, a
    # notebook) must see the library's records again, whether the command ended well or not.
    logger = logging.getLogger("mllama_export")
    before = (list(logger.handlers), logger.level, logger.propagate)
    invoke(*args)
    assert (list(logger.handlers), logger.level, logger.propagate) == before
    with caplog.at_level("INFO", logger="mllama_export"):
        logger.info("after the command")
    assert [r.getMessage() for r in caplog.records] == ["after the command"]
