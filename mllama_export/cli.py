"""The `mllama-export` command line: thin click commands over one library call each."""

from __future__ import annotations

import sys
import traceback

import click

from mllama_export.errors import MllamaExportError


class _Group(click.Group):
    """Prints user errors as one line and exits 2 (click's own usage errors too); --debug
    (or MLLAMA_EXPORT_DEBUG=1) keeps the traceback."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except click.ClickException as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # no arguments: the help, as asked
                err.show()
                sys.exit(err.exit_code)
            ctx = getattr(err, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            click.echo(f"error: {_one_line(err.format_message())}{hint}", err=True)
            sys.exit(err.exit_code)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MllamaExportError as err:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {_one_line(str(err))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing complete-looking was left behind", err=True)
            sys.exit(130)


def _one_line(message: str) -> str:
    return " ".join(message.split())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--debug", is_flag=True, envvar="MLLAMA_EXPORT_DEBUG", help="Show tracebacks of errors."
)
@click.version_option(package_name="mllama-export")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Export Llama 3.2 Vision (mllama) to ONNX and TensorRT, run it, and gate its accuracy.

    Progress goes to stderr; each command's answer (generated text, tables, verdicts) to
    stdout."""
    from mllama_export import console

    ctx.obj = {"debug": debug}
    ctx.call_on_close(console.install())


def _register() -> None:
    from .commands import build, engines, inspect, plan, run, sensitivity, synth, validate

    for module in (synth, build, engines, run, inspect, plan, validate, sensitivity):
        main.add_command(module.command)


_register()
