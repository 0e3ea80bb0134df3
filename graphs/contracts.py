"""docs/graphs.md: every registered family's contract, generated so that the two cannot drift
apart (tests/test_contract.py). Each family's "contract" part writes its own section
(``contract_markdown()``); this module only puts them in the registry's order."""

from __future__ import annotations

from .family import families

PREFACE = [
    "# The graphs and their contract",
    "",
    "Generated from every model family's contract by `python -m mllama_export.graphs.contracts`;",
    "a test fails when this file and the code disagree. One section per family.",
]


def contracts_markdown() -> str:
    sections = [f.part("contract").contract_markdown() for f in families() if f.has("contract")]
    return "\n".join(["\n".join(PREFACE) + "\n", *sections])


if __name__ == "__main__":
    print(contracts_markdown(), end="")
