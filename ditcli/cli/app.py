"""The `dit` command: a thin Typer shell over the core modules."""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup, TyperOption

from ditcli.errors import UserError
from ditcli.ranks import AgreedError, env_rank, world_size
from ditcli.version import __version__

# Errors the shell reports as one line: a UserError, or a path the user gave that the system refused (these, and any
# OSError that names its file: a name too long, a symlink loop, a full or read-only disk). Anything else, a ValueError
# included, is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# Typer's usage errors (unknown option or command, malformed value, missing argument): the base class of its public
# BadParameter, whichever click (its own copy or the click package) this Typer is built on.
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _as_shown(param) -> None:
    """One way of writing options in --help: a switch as a bare flag (Typer would show `<bool>`, inviting `--json
    true`, which a switch refuses), and a default as the help's closing " Default: X.", as `dit train` writes its
    own, instead of Typer's "[default: X]". A switch is off unless given, so a lone one needs no note."""
    if not isinstance(param, TyperOption):
        return
    if param.is_flag and param.metavar is None:
        param.metavar = ""
    default = param.default
    if param.show_default is True and param.help and default is not None and not isinstance(default, bool) \
            and "Default" not in param.help:
        shown = f"{default:g}" if isinstance(default, float) else default
        param.help = f"{param.help.rstrip()} Default: {shown}."
        param.show_default = False


class _ShownOneWay:
    """A command or group whose options, --help included, are written one way (`_as_shown`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            _as_shown(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        _as_shown(option)
        return option


class _Command(_ShownOneWay, TyperCommand):
    """A `dit` subcommand; an option given an empty value (`--out ""`, `--out=`, an unset shell variable), which
    would silently read as its default, or as the working folder for a path, is refused."""

    def parse_args(self, ctx, args):
        valued = {opt for param in self.params if not getattr(param, "is_flag", False) for opt in param.opts}
        for i, arg in enumerate(args):
            name, equals, value = str(arg).partition("=")  # CliRunner callers may pass numbers
            if name in valued and (value == "" if equals else i + 1 < len(args) and args[i + 1] == ""):
                raise UserError(f"{name} is empty", f"pass a value, or drop {name} for its default")
        return super().parse_args(ctx, args)


class _ErrorsAsOneLine(_ShownOneWay, TyperGroup):
    """Turns a user error raised anywhere under a command, and Typer's own usage errors, into one line
    `error: <what> (<how to fix>)` and exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except USAGE_ERROR as exc:  # an unknown or malformed option of `dit` itself
            raise _report(_usage_line(exc, "see `dit --help`")) from None

    def invoke(self, ctx):
        given = list(ctx.args)  # the subcommand's arguments, which the group's invoke empties
        try:
            return super().invoke(ctx)
        except USAGE_ERROR as exc:  # a subcommand's options failed to parse
            raise _report(_switch_line(exc, given) or _usage_line(exc, _help_hint(ctx))) from None
        except (*USER_ERRORS, OSError) as exc:
            if ctx.params.get("debug") or not isinstance(exc, USER_ERRORS) and exc.filename is None:
                raise
            if isinstance(exc, AgreedError) and env_rank() != 0:  # every rank raised it; rank 0 reports it
                raise typer.Exit(2) from None
            raise _report(_one_line(exc, _help_hint(ctx))) from None
        except EOFError as exc:  # Typer would turn this into a bare "Aborted."
            if ctx.params.get("debug"):
                raise RuntimeError("a file ended before the data it announced") from exc
            raise _report(f"a file ended before the data it announced ({_help_hint(ctx)})") from None


def _report(line: str) -> typer.Exit:
    if env_rank() != 0:  # usage errors come from the command line, the same on every rank: rank 0 reports them
        return typer.Exit(2)
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {line}", markup=False)
    return typer.Exit(2)


def _help_hint(ctx) -> str:
    command = " ".join(filter(None, [ctx.command_path, ctx.invoked_subcommand]))
    return f"see `{command} --help`"


def _usage_line(exc, fallback_hint: str) -> str:
    """Typer's usage error as `<what> (<how to fix>)`, without the usage box."""
    what = " ".join(exc.message.split()).rstrip(".")
    if getattr(exc, "param", None) is not None or getattr(exc, "param_hint", None) is not None:
        what = " ".join(exc.format_message().split()).rstrip(".")  # "Invalid value for '--steps': ..."
    what, _, suggestion = what.partition(". Did you mean ")  # Typer's suggestion for a mistyped command
    hint = f"see `{exc.ctx.command_path} --help`" if exc.ctx is not None else fallback_hint
    options = sorted(getattr(exc, "possibilities", None) or _close_options(exc))
    if suggestion or options:
        hint = f"did you mean {suggestion.rstrip('?') or ' or '.join(options)}? {hint}"
    return f"{what[:1].lower()}{what[1:]} ({hint})"


def _switch_line(exc, given: list[str]) -> str | None:
    """For a value given to an on/off switch (`--compile auto`), the line that says how to write it; else None."""
    extra = re.search(r"unexpected extra argument\S* \(([^)\s]+)", exc.message or "")
    if extra is None or exc.ctx is None or extra.group(1) not in given[1:]:
        return None
    before = given[given.index(extra.group(1), 1) - 1]  # the option the value follows
    switch = next((param for param in exc.ctx.command.params if getattr(param, "is_flag", False)
                   and before in param.opts), None)
    if switch is None:
        return None
    ways = f"{before} or {switch.secondary_opts[0]}, or leave both out" if switch.secondary_opts else \
        f"{before} alone, or leave it out"
    return f"{before} is a switch and takes no value, got {extra.group(1)!r} (pass {ways} for the default)"


def _close_options(exc) -> list[str]:
    """For an unknown option, the command's options that look like it."""
    name = getattr(exc, "option_name", None)
    if name is None or exc.ctx is None:
        return []
    known = [opt for param in exc.ctx.command.params for opt in param.opts if opt.startswith("--")]
    return difflib.get_close_matches(name, known, n=2, cutoff=0.6)


def _one_line(exc: BaseException, fallback_hint: str) -> str:
    """`<what> (<how to fix>)`: a UserError's own hint, else one that fits the kind of error."""
    if isinstance(exc, UserError):
        return f"{' '.join(exc.what.split())} ({exc.hint or fallback_hint})"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename} (check the path and its permissions)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if text.endswith(")") else f"{text} ({fallback_hint})"


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
    from ditcli.cli import classes, convert, fid, sample, train

    app.command("train", cls=_Command)(train.train)
    app.command("sample", cls=_Command)(sample.sample)
    app.command("classes", cls=_Command)(classes.classes)
    app.command("fid", cls=_Command)(fid.fid)
    app.command("convert", cls=_Command)(convert.convert)


_register()


def main():
    if world_size() <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        app(prog_name="dit")
        return
    # A torchrun worker exits with its code as soon as the command is done: in the interpreter's teardown a backend
    # thread (gloo's, the store's) could still be joinable and abort the process (SIGABRT, "terminate called without
    # an active exception"), turning a clean exit 0 or 2 into a failed rank. Files are closed and renamed by then.
    try:
        app(prog_name="dit")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
