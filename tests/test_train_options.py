"""`dit train` declares each option once: every TrainConfig field is exactly one flag, every flag is a field or one of
the command's own options, and every option sits in a help panel."""

import dataclasses
import json
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from ditcli.cli import train as train_command
from ditcli.cli.app import app
from ditcli.training.config import OPTION_GROUPS, TrainConfig

# The options of `dit train` that are not TrainConfig fields: how to run, not what a run is (ditcli/cli/train.py).
SHELL_ONLY = {"preset", "resume", "force", "json_out", "dist_timeout"}

runner = CliRunner()


def train_params() -> list:
    return [param for param in typer.main.get_command(app).commands["train"].params if param.name != "help"]


def option_problems(fields: list[str], params: list, shell_only: set[str]) -> list[str]:
    """Each way the options break "one field, one flag, one panel", as a line."""
    problems = [f"field {name} has {count} flags" for name in fields
                if (count := [param.name for param in params].count(name)) != 1]
    for param in params:
        if param.name in fields and param.opts != ["--" + param.name.replace("_", "-")]:
            problems.append(f"field {param.name} is spelt {param.opts}")
        if param.name not in fields and param.name not in shell_only:
            problems.append(f"{'/'.join(param.opts)} is neither a TrainConfig field nor a shell-only option")
        if param.rich_help_panel not in OPTION_GROUPS:
            problems.append(f"{'/'.join(param.opts)} sits in no panel ({param.rich_help_panel})")
    return problems


def test_every_field_is_one_flag_and_every_flag_a_field_or_a_shell_option_in_a_panel():
    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    assert option_problems(fields, train_params(), SHELL_ONLY) == []


def test_the_checker_sees_a_missing_flag_a_stray_flag_and_an_option_outside_the_panels():
    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    params = train_params()
    assert option_problems([*fields, "warmup_images"], params, SHELL_ONLY) == ["field warmup_images has 0 flags"]
    assert option_problems(fields, params, SHELL_ONLY - {"resume"}) == [
        "--resume is neither a TrainConfig field nor a shell-only option"]
    assert option_problems(fields, [param for param in params if param.name != "lr"], SHELL_ONLY) == [
        "field lr has 0 flags"]

    stray = typer.Typer(add_completion=False)

    @stray.command()
    def command(lr: Annotated[float, typer.Option("--learning-rate")] = 1.0, other: int = 0):
        """Two options: a field spelt another way, and one in no panel."""

    problems = option_problems(["lr", "other"], typer.main.get_command(stray).params, set())
    assert problems == ["field lr is spelt ['--learning-rate']", "--learning-rate sits in no panel (None)",
                        "--other sits in no panel (None)"]


@pytest.fixture
def trained(monkeypatch, tmp_path):
    """`dit train` with the Trainer replaced by a recorder of the config it was given."""
    seen = {}

    class FakeTrainer:
        def __init__(self, config, *args, **kwargs):
            seen.update(config=config, args=args, kwargs=kwargs)

        def run(self):
            return {"interrupted": False, "step": 0}

    monkeypatch.setattr(train_command, "Trainer", FakeTrainer)
    monkeypatch.chdir(tmp_path)
    return seen


def train(*options):
    result = runner.invoke(app, ["train", "--json", *options])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"interrupted": False, "step": 0}


def test_options_left_out_take_the_field_defaults(trained):
    train("--data", "fashion-mnist", "--vae", "none")
    assert trained["config"] == TrainConfig(data="fashion-mnist", vae=None)
    assert trained["args"][2:] == (None, False) and trained["kwargs"] == {"dist_timeout": 600.0}  # resume, force


def test_options_given_reach_the_config_over_a_preset(trained):
    train("--preset", "fashion-mnist", "--out", "./runs/x/", "--device", "cpu", "--compile", "--no-flip",
          "--log", "tensorboard", "--log", "jsonl", "--grad-clip", "0", "--resume", "auto", "--force")
    config = trained["config"]
    assert (config.out, config.device, config.compile, config.flip, config.log, config.grad_clip) == (
        "runs/x", "cpu", True, False, ("jsonl", "tensorboard"), 0.0)
    assert (config.model, config.hidden_size, config.objective) == ("DiT-S/4", 192, "flow")  # the preset's
    assert trained["args"][2:] == ("auto", True)


def test_debug_lets_a_non_zero_rank_speak(trained, monkeypatch):
    """Under torchrun rank 0 renders; --debug, an option of the root command, lets the others show progress too."""
    quiet_runs = []

    class Progress:
        def __init__(self, config, console, quiet: bool):
            self.on_event = None
            quiet_runs.append(quiet)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(train_command, "TrainProgress", Progress)
    monkeypatch.setattr(train_command, "env_rank", lambda: 1)
    for root in ([], ["--debug"]):
        assert runner.invoke(app, [*root, "train", "--data", "fashion-mnist", "--vae", "none"]).exit_code == 0
    assert quiet_runs == [True, False]
