"""The rows of the bad-input table (tests/test_bad_inputs.py), shared by the modules that
declare them: each family's rows live beside that family's own setups."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Row:
    cli: bool
    setup: Callable[[Any], Any]  # CLI: the arguments; API: a call without arguments (any
    # file it reads is made by the setup, not by the call, so the snapshot sees it)
    fragments: tuple[str, ...]  # all must appear in the message


def cli(id_: str, setup, *fragments: str, marks=()):
    return pytest.param(Row(True, setup, fragments), id=f"cli-{id_}", marks=marks)


def api(id_: str, setup, *fragments: str, marks=()):
    return pytest.param(Row(False, setup, fragments), id=f"api-{id_}", marks=marks)
