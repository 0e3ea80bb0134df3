from __future__ import annotations

from pathlib import Path

import click

from ._shared import graph_names


@click.command("engines")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("graphs", nargs=-1, type=click.Choice(graph_names()))
@click.option(
    "--rebuild",
    is_flag=True,
    help="Rebuild the named engines (default: all) even where this TensorRT on this GPU "
    "already built them.",
)
def command(folder: Path, graphs: tuple[str, ...], rebuild: bool) -> None:
    """Build the TensorRT engines of an artifact folder written by `mllama-export build`:
    the retry after a failed engine, or engines for ONNX built on another machine. The ONNX
    files are checked against the manifest first and left as they are. GRAPHS (vision,
    prefill, decode; artifacts built with --text-engine shared have no prefill engine)
    limits the build to those; by default every engine not yet built by this TensorRT on
    this GPU is built.

    \b
    Examples:
      mllama-export engines out/tiny
      mllama-export engines out/tiny decode --rebuild
    """
    from mllama_export.exporter.build import rebuild_engines

    entry = rebuild_engines(folder, list(graphs) or None, rebuild)  # progress: the logger
    for name, engine in entry.get("engines", {}).items():
        status = engine.get("status", "?")
        detail = f"{engine['file']}, {engine['bytes']:,} bytes" if status == "built" else ""
        click.echo(f"{name:8s} {status}" + (f"  ({detail})" if detail else ""))
    click.echo(f"TensorRT {entry.get('version')} on {entry.get('device')}: engines in {folder}")
