from pathlib import Path

from mllama_export.graphs.contract import contract_markdown


def test_docs_graphs_md_is_generated_from_the_contract():
    doc = Path(__file__).parent.parent / "docs" / "graphs.md"
    assert doc.read_text() == contract_markdown(), (
        "run: python -m mllama_export.graphs.contract > docs/graphs.md"
    )
