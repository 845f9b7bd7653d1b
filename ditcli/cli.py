"""The `dit` command: a thin Typer shell over the core modules."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from ditcli import __version__
from ditcli.errors import UserError
from ditcli.ranks import AgreedError, env_rank

# Errors the shell reports as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)


class _ErrorsAsOneLine(TyperGroup):
    """Turns a user error raised anywhere under a command into `error: ...` and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            if ctx.params.get("debug"):
                raise
            if isinstance(exc, AgreedError) and env_rank() != 0:  # every rank raised it; rank 0 reports it
                raise typer.Exit(2) from None
            Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {_one_line(exc)}", markup=False)
            raise typer.Exit(2) from None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return " ".join(str(exc).split()) or type(exc).__name__


app = typer.Typer(cls=_ErrorsAsOneLine, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train, sample, evaluate and convert DiT diffusion transformers.")


def _version(value: bool):
    if value:
        typer.echo(f"dit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """Train, sample, evaluate and convert DiT diffusion transformers."""


def _register():
    from ditcli.commands import convert, fid, sample, train

    app.command("train")(train.train)
    app.command("sample")(sample.sample)
    app.command("classes")(sample.classes)
    app.command("fid")(fid.fid)
    app.command("convert")(convert.convert)


_register()


def main():
    app(prog_name="dit")
