"""`dit train`: builds a TrainConfig from options or a preset, runs the Trainer under a progress bar.

Every TrainConfig field is one option, declared once on the field (`ditcli.training.config.option`: help text, flag,
group). `field_options` turns the fields into Typer options, and `train.__signature__`, which Typer reads, lists them
with the command's own options (how to run, not what a run is) panel by panel.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import signal
import threading
import types
import typing
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ditcli.cli.options import DistTimeoutOpt, JsonOpt, in_panel
from ditcli.cli.progress import TrainProgress
from ditcli.errors import UserError
from ditcli.ranks import DEFAULT_TIMEOUT_S, env_rank, from_arguments, world_size
from ditcli.runtime import set_backend_flags
from ditcli.training.checkpoints import NO_RESUME, stored_settings
from ditcli.training.config import (
    CHECKPOINTS,
    DATA,
    LOGGING,
    OPTION_GROUPS,
    PERFORMANCE,
    TRAIN_PRESETS,
    TrainConfig,
    config_from_options,
)
from ditcli.training.trainer import Trainer

console = Console(stderr=True, soft_wrap=True)

# The command's own options: not part of a run's configuration, so not TrainConfig fields.
RecipeOpt = Annotated[str | None, typer.Option(
    "--preset", help=f"A ready recipe: {', '.join(TRAIN_PRESETS)}; other options override its values. Default: none.",
    show_default=False, rich_help_panel=DATA)]
ResumeOpt = Annotated[str | None, typer.Option(
    "--resume", help="auto (latest in --out; with --init-from, the source on the first run) or a ckpt-*.pt. The "
                     "options not given take the run's stored settings. Default: start afresh (refused where --out "
                     "holds a run).", show_default=False, rich_help_panel=CHECKPOINTS)]
ForceResumeOpt = Annotated[bool, typer.Option("--force", help="Resume even if the configuration differs.",
                                        rich_help_panel=CHECKPOINTS)]
JsonOutOpt = in_panel(JsonOpt, LOGGING)
DistTimeoutPanelOpt = in_panel(DistTimeoutOpt, PERFORMANCE)


def train(
    ctx: typer.Context, preset: RecipeOpt = None, resume: ResumeOpt = None, force: ForceResumeOpt = False,
    json_out: JsonOutOpt = False, dist_timeout: DistTimeoutPanelOpt = float(DEFAULT_TIMEOUT_S), **fields,
):
    """Train a DiT on an image folder, Fashion-MNIST or an .npz; resumable, mixed precision, torchrun-ready.

    With --preset, the options you leave out take the preset's values instead of the defaults shown; with --resume,
    the run's stored settings (`dit train --resume auto --out RUN` alone continues RUN).
    """
    with from_arguments():  # the same options on every rank, and the same run folder (a disk all nodes share)
        if force and resume in NO_RESUME:
            raise UserError("--force only applies with --resume: it resumes a run whose settings differ",
                            "drop --force, or add --resume auto")
        values = config_values(fields)
        out = Path(values.get("out") or TrainConfig.__dataclass_fields__["out"].default)
        config = config_from_options(preset, stored_settings(resume, out), **values)
    set_backend_flags()  # TF32 and cuDNN autotuning, as the reference train.py enables them
    # Under torchrun all ranks compute and rank 0 renders; the others stay silent unless --debug.
    speaks = env_rank() == 0 or bool(ctx.find_root().params.get("debug"))
    stop = threading.Event()
    _on_signals(stop, speaks)
    with TrainProgress(config, console, quiet=json_out or not speaks) as progress:
        result = Trainer(config, progress.on_event, stop.is_set, resume, force, dist_timeout=dist_timeout).run()
    if env_rank() != 0:
        return
    if json_out:
        typer.echo(json.dumps(result))
    elif result["interrupted"]:
        console.print(f"stopped at step {result['step']}; resume with: dit train --resume auto --out {config.out}")
    else:
        console.print(progress.final_line(result), highlight=False, soft_wrap=True)


def _on_signals(stop: threading.Event, speaks: bool):
    """SIGINT/SIGTERM finish the current step, save a checkpoint and exit cleanly.

    The trainer all-reduces the request, so a signal that reaches one rank stops every rank at the same step. Alone,
    a second signal aborts at once; under torchrun it is ignored, since torchrun forwards the Ctrl-C that the workers
    already got, and kills them itself when they take too long.
    """
    def handler(signum, frame):
        if stop.is_set():
            if world_size() == 1:
                raise KeyboardInterrupt
            return
        stop.set()
        if speaks:
            console.print(f"rank {env_rank()} received {signal.Signals(signum).name}: saving a checkpoint at the end "
                          "of this step and stopping")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def config_values(given: dict) -> dict:
    """Typer's values of the field options as TrainConfig's: a path as text, and the trackers of --log after the
    jsonl that every run writes. None stays None: the option was not given."""
    values = {name: str(value) if isinstance(value, Path) else value for name, value in given.items()}
    values["log"] = tuple(dict.fromkeys(["jsonl", *given["log"]])) if given.get("log") else None
    return values


def field_options() -> list[inspect.Parameter]:
    """One keyword option per TrainConfig field, None unless given so that a --preset can fill it; `--help` shows the
    field's default."""
    hints = typing.get_type_hints(TrainConfig)
    return [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[_parsed(field, hints[field.name]) | None, _option(field, hints)])
            for field in dataclasses.fields(TrainConfig)]


def _parsed(field: dataclasses.Field, hint) -> type:
    """The type the option reads: the field's `parse`, else its own less None; a tuple repeats the flag (a list)."""
    if field.metadata["parse"] is not None:
        return field.metadata["parse"]
    if typing.get_origin(hint) is tuple:
        return list[typing.get_args(hint)[0]]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _option(field: dataclasses.Field, hints: dict):
    """The field's flag (--name, --name/--no-name for a bool, or its own), help and panel."""
    name = "--" + field.name.replace("_", "-")
    flag = field.metadata["flag"] or (f"{name}/--no-{name[2:]}" if hints[field.name] is bool else name)
    return typer.Option(flag, help=field.metadata["help"] + _default_note(flag, field.default), show_default=False,
                        rich_help_panel=field.metadata["group"])


def _default_note(flag: str, value) -> str:
    """The help's closing " Default: X." from the field's default; none where there is none or it is None (the help
    then says what happens)."""
    if value is None or value is dataclasses.MISSING:
        return ""
    if isinstance(value, bool):
        on, _, off = flag.partition("/")
        return f" Default: {on if value else off}." if value or off else ""  # a lone switch is off unless given
    shown = f"{value:g}" if isinstance(value, float) else ", ".join(value) if isinstance(value, tuple) else value
    return f" Default: {shown}."


def _panel_order(parameter: inspect.Parameter) -> int:
    """Where the option's panel comes in `--help`; the context first."""
    extras = getattr(parameter.annotation, "__metadata__", ())
    return OPTION_GROUPS.index(extras[0].rich_help_panel) if extras else -1


def command_signature() -> inspect.Signature:
    """`train`'s own options and one per TrainConfig field, keyword-only and grouped by panel."""
    own = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for parameter in inspect.signature(train, eval_str=True).parameters.values()
           if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
    return inspect.Signature(sorted(field_options() + own, key=_panel_order))


train.__signature__ = command_signature()
