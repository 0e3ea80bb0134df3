"""Every example in every command's --help runs as written, in the order a user would run
them, in an empty folder holding only the image they name (a.jpg): synth's write ckpt/tiny,
build's the artifact folders that run, inspect, plan, validate and sensitivity read."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from mllama_export.cli import main

# the order a new user meets them: checkpoints, then builds, then what uses the builds
ORDER = ("synth", "build", "engines", "run", "inspect", "plan", "validate", "sensitivity")


def help_text(command: str) -> str:
    return CliRunner().invoke(main, [command, "--help"], terminal_width=400).output


def examples(command: str) -> list[str]:
    text = help_text(command)
    assert "Examples:" in text, f"{command} --help has no examples"
    block = text.split("Examples:", 1)[1]
    return [
        line.strip() for line in block.splitlines() if line.strip().startswith("mllama-export ")
    ]


def test_every_command_has_examples_and_every_option_example_is_one_of_them():
    assert set(ORDER) == set(main.commands)
    for command in ORDER:
        lines = examples(command)
        assert lines and all(shlex.split(line)[1] == command for line in lines)
        for param in main.commands[command].params:
            for value in re.findall(r"e\.g\. ('[^']+'|[^\s,;]+)", param.help or ""):
                used = [f"{opt} {value}" for opt in param.opts]
                assert any(u in line for u in used for line in lines), (command, used)


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    Image.open(Path(__file__).parents[1] / "docs" / "example.png").convert("RGB").save(
        tmp_path / "a.jpg", "JPEG"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tensorrt_unavailable():
    from mllama_export.exporter.engine_stage import tensorrt_unavailable

    return tensorrt_unavailable(needs_fp8=False)


def test_every_help_example_runs_as_written(workdir):
    ran = 0
    for command in ORDER:
        for line in examples(command):
            result = CliRunner().invoke(main, shlex.split(line)[1:])
            if command == "engines" and tensorrt_unavailable() is not None:
                # as written it runs where TensorRT and a GPU exist; here it says why not
                assert result.exit_code == 2, (line, result.output[-3000:])
                assert "cannot build TensorRT engines here" in result.output
            else:
                assert result.exit_code == 0, (line, result.output[-3000:])
            ran += 1
    assert ran >= 15
