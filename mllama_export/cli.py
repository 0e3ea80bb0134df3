"""The `mllama-export` command line: thin click commands over one library call each."""

from __future__ import annotations

import sys
import traceback

import click

from mllama_export.errors import MllamaExportError


class _Group(click.Group):
    """Prints user errors as one line and exits 2; --debug (or MLLAMA_EXPORT_DEBUG=1) keeps
    the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MllamaExportError as err:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing complete-looking was left behind", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--debug", is_flag=True, envvar="MLLAMA_EXPORT_DEBUG", help="Show tracebacks of errors."
)
@click.version_option(package_name="mllama-export")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Export Llama 3.2 Vision (mllama) to ONNX and TensorRT, run it, and gate its accuracy."""
    ctx.obj = {"debug": debug}


def _register() -> None:
    from .commands import build, engines, inspect, plan, run, sensitivity, synth, validate

    for module in (synth, build, engines, run, inspect, plan, validate, sensitivity):
        main.add_command(module.command)


_register()
