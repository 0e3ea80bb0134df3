"""Each closed set of choices is declared once (graphs/choices.py): the CLI's click.Choice
lists are those tuples, and the tables holding data per choice have exactly their keys."""

from __future__ import annotations

import subprocess
import sys

import click

from mllama_export.cli import main
from mllama_export.exporter.options import PRECISION_TORCH_DTYPES
from mllama_export.exporter.plan import GPUS
from mllama_export.graphs import choices
from mllama_export.graphs.config import PRESETS
from mllama_export.graphs.contract import GRAPH_NAMES


def test_tables_have_exactly_the_declared_choices():
    assert tuple(PRESETS) == choices.PRESET_NAMES
    assert tuple(GPUS) == choices.GPU_NAMES
    assert tuple(PRECISION_TORCH_DTYPES) == choices.PRECISIONS == tuple(choices.PRECISION_DTYPES)
    assert set(choices.STORAGE_PRECISIONS) < set(choices.PRECISIONS)
    assert choices.DEFAULT_TEXT_ENGINE in choices.TEXT_ENGINES
    assert choices.DEFAULT_BACKEND in choices.BACKENDS


def test_every_cli_choice_comes_from_the_choices_module():
    declared = {v for v in vars(choices).values() if isinstance(v, tuple)}
    # the graph names of `engines GRAPHS` belong to the graph registry (graphs/contract.py)
    graphs = GRAPH_NAMES
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param.type, click.Choice):
                found = tuple(param.type.choices)
                assert found in declared or found == graphs, f"{name} {param.name}: {found}"


def test_the_cli_imports_neither_torch_nor_numpy():
    code = "import sys, mllama_export.cli; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
