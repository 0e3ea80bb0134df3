from __future__ import annotations

from pathlib import Path

import click

from mllama_export.errors import MllamaExportError


@click.command("inspect")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--no-verify",
    is_flag=True,
    help="Do not check every file against its sha256 (quicker on large artifacts); the last "
    "line then says that nothing was checked.",
)
def command(folder: Path, no_verify: bool) -> None:
    """Print an artifact folder's manifest as a readable table, check every file against its
    sha256 (exit 2 naming the files that do not match), and name what dead builds left
    beside it.

    \b
    Examples:
      mllama-export inspect out/tiny
      mllama-export inspect out/tiny --no-verify
    """
    from mllama_export.engines.manifest_read import file_problems, read_manifest

    _leftovers(folder)
    m = read_manifest(folder)
    try:
        _show(m)
    except (KeyError, TypeError, AttributeError) as err:
        raise MllamaExportError(
            f"{folder / 'manifest.json'} lacks or mangles the entry {err}; expected a manifest "
            "written by `mllama-export build` (rebuild the artifacts)"
        ) from err
    count = len(m["files"])
    if no_verify:
        click.echo(f"\nfiles: {count}, NOT checked against their sha256 (--no-verify)")
        return
    problems = file_problems(folder, m)
    if problems:
        for name, problem in problems:
            click.echo(f"  {name} {problem}")
        names = ", ".join(name for name, _ in problems[:3]) + (" ..." if len(problems) > 3 else "")
        raise MllamaExportError(
            f"{folder}: {len(problems)} of {count} files do not match the manifest ({names}); "
            "rebuild the artifacts"
        )
    click.echo(f"\nfiles: {count}, each checked against its sha256: all match")


def _leftovers(folder: Path) -> None:
    from mllama_export.exporter.outdir import stale_leftovers

    for left in stale_leftovers(folder.absolute().parent, folder.absolute().name):
        click.echo(
            f"note: {left.describe()}; `mllama-export build --out {folder}` removes it",
            err=True,
        )


def _show(m: dict) -> None:
    from mllama_export.exporter.manifest import summarize_check

    trt = m.get("tensorrt") if isinstance(m.get("tensorrt"), dict) else {}
    rows = [
        ("source", _source(m["model"])),
        *_model_rows(m["model"]),
        ("precision", f"{m['precision']} (I/O {m['io_dtype']})"),
        *([("fp8", _fp8_line(m["quantization"]))] if m.get("quantization") else []),
        ("limits", ", ".join(f"{k} {v}" for k, v in m["limits"].items())),
        ("tensorrt", _tensorrt_line(trt)),
        *[(f"  {name}", _engine_line(e)) for name, e in (trt.get("engines") or {}).items()],
        *([("fp8 layers", _fp8_layers_line(trt))] if _fp8_layers_line(trt) else []),
        (
            "built",
            f"{m.get('built_at', '?')} with "
            + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    for name, graph in m["graphs"].items():
        click.echo(f"\n[{name}] {graph['file']}, weights in {graph.get('weights', '?')}")
        click.echo(
            f"  checked against PyTorch: {summarize_check(graph.get('check') or {}, detail=True)}"
        )
        for kind in ("inputs", "outputs"):
            for spec in graph[kind]:
                dims = ", ".join(spec["dims"])
                click.echo(f"  {kind[:-1]:6s} {spec['name']:22s} {spec['dtype']:8s} [{dims}]")


def _model_rows(model: dict) -> list[tuple[str, str]]:
    """The text decoder's size (a config.json with a text_config, or a flat one), and the
    fields a family adds to the manifest's model entry (Mllama: the xattn mask)."""
    config = model.get("config") or {}
    text = config.get("text_config", config)
    rows = []
    if all(k in text for k in ("num_hidden_layers", "hidden_size", "vocab_size")):
        size = f"{text['num_hidden_layers']} layers, hidden {text['hidden_size']}"
        rows.append(("text", f"{size}, vocab {text['vocab_size']}"))
    if "xattn_mask" in model:
        tap = model.get("vision_tap", "?")
        rows.append(("xattn mask", f"{model['xattn_mask']} (vision taps at the {tap})"))
    return rows


def _tensorrt_line(trt: dict) -> str:
    text = (
        "; text engine shared (the decode engine serves prefill: the text weights once)"
        if trt.get("text_engine") == "shared"
        else ""
    )
    if trt.get("built"):
        return f"built by TensorRT {trt.get('version')} on {trt.get('device')}{text}"
    return f"{trt.get('status', 'not built')}: {trt.get('reason', 'not recorded')}{text}"


def _engine_line(engine: dict) -> str:
    status = engine.get("status", "?")
    if status == "built":
        return f"built, {engine.get('precision')} graph, strongly typed, {engine.get('bytes', 0):,} bytes"
    if status == "failed":
        return f"FAILED: {engine.get('error')} (log {engine.get('log')})"
    return status


def _fp8_layers_line(trt: dict) -> str:
    """What TensorRT's engine inspector said of the FP8 engines' GEMMs, at build time."""
    parts = []
    for name, engine in (trt.get("engines") or {}).items():
        check = engine.get("fp8_layers")
        if check:
            parts.append(
                f"{name} {check['fp8_gemm_layers']} of {check['gemm_layers']} GEMM layers run "
                f"in FP8 ({check['quantized_layers']} layers quantized)"
                + ("" if check.get("ok") else ", NONE in FP8: the Q/DQ were not fused")
            )
    return "; ".join(parts)


def _fp8_line(q: dict) -> str:
    vision = "with" if q.get("vision_encoder") else "without"
    excluded = q.get("excluded") or []
    calibration = q.get("calibration", {})
    where = calibration.get("set", "?").split(" (")[0].split(";")[0]
    # artifacts from before the per-tensor default had per-channel weight scales
    scheme = q.get("weight_scheme", "per-channel")
    return (
        f"{len(q.get('layers', {}))} linear layers, {vision} the vision encoder"
        + (f", excluding {', '.join(excluded)}" if excluded else "")
        + f"; {scheme} weight scales"
        + f"; calibrated on the {where} ({len(calibration.get('cases', []))} cases)"
    )


def _source(model: dict) -> str:
    source, checkpoint = model["source"], model.get("checkpoint")
    if model.get("kind") == "hub":
        return (
            f"{source} (Hugging Face Hub, revision {model.get('revision')}, cached at {checkpoint})"
        )
    if checkpoint and checkpoint != source:
        return f"{source} ({checkpoint})"
    return source
