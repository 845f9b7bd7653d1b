"""The one place that turns progress callbacks into rich bars; core modules only call back.

    with ProgressBar(total=64, description="sampling", unit="img") as bar:
        for batch in generate_images(...):      # the core calls bar.substatus("step 3/25") per step
            bar.advance(len(batch.indices))

A disabled bar (not a terminal, --json, or a non-zero rank) accepts the same calls and draws nothing. `TrainProgress`
renders the trainer's events (start-up table, bar, one line per checkpoint) for `dit train`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text


class RateColumn(ProgressColumn):
    """Units per second, e.g. "3.2 img/s"."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:
            speed = task.completed / task.elapsed
        if not speed:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:.3g} {self.unit}/s", style="progress.data.speed")


class ProgressBar:
    """A bar over `total` units with rate, elapsed time and ETA, plus a free-text sub-status (e.g. the current step).

    `unit="B"` shows transferred bytes and speed, for downloads.
    """

    def __init__(self, total: float | None, description: str, unit: str = "it", enabled: bool = True,
                 console: Console | None = None):
        self.enabled = enabled
        self.total = total
        self.description = description
        self.unit = unit
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None

    def columns(self) -> list[ProgressColumn]:
        if self.unit == "B":
            counts = [DownloadColumn(), TransferSpeedColumn()]
        else:
            counts = [MofNCompleteColumn(), TextColumn(self.unit), RateColumn(self.unit)]
        return [TextColumn("{task.description}"), BarColumn(), *counts, TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), TextColumn("{task.fields[status]}")]

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self.progress = Progress(*self.columns(), console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total, status="")
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # an error ends the command: its one line is all that should remain
            self.discard()
        elif self.progress is not None:
            self.progress.stop()

    def discard(self) -> None:
        """Remove the bar from the screen (or never print it, off a terminal) and draw nothing more."""
        if self.progress is not None:
            discard_live(self.progress)
            self.progress = None

    def advance(self, n: float = 1, **fields) -> None:
        """Count `n` more units done; extra fields (loss=..., nfe=...) are shown as the sub-status."""
        if self.progress is not None:
            self.progress.update(self.task, advance=n, **self._status(fields))

    def update(self, completed: float, total: float | None = None, **fields) -> None:
        """Set the absolute position (e.g. bytes downloaded so far)."""
        if self.progress is not None:
            changes = {"completed": completed, **self._status(fields)}
            if total is not None:
                changes["total"] = total
            self.progress.update(self.task, **changes)

    def substatus(self, text: str) -> None:
        """Replace the sub-status text, e.g. "step 12/250"."""
        if self.progress is not None:
            self.progress.update(self.task, status=text)

    def step(self, step: int, num_steps: int) -> None:
        """A denoising-step callback: shows "step i/n", or "step i" for an adaptive solver (n = 0)."""
        self.substatus(f"step {step + 1}/{num_steps}" if num_steps else f"step {step + 1} (adaptive)")

    @staticmethod
    def _status(fields: dict) -> dict:
        if not fields:
            return {}
        return {"status": " ".join(f"{k}={_short(v)}" for k, v in fields.items())}


def discard_live(progress: Progress) -> None:
    """Stop a rich Progress leaving nothing behind: erased on a terminal, never printed elsewhere."""
    progress.live.transient = True
    console, quiet = progress.console, progress.console.quiet
    console.quiet = quiet or not console.is_terminal  # off a terminal nothing was shown yet: keep it so
    try:
        progress.stop()
    finally:
        console.quiet = quiet


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contextlib.contextmanager
def byte_progress(description: str, enabled: bool = True) -> Iterator[Callable[[int, int | None], None]]:
    """A `progress(done_bytes, total_bytes)` callback whose bar opens on the first call, so nothing shows unless a
    download actually happens."""
    bars: list[ProgressBar] = []

    def progress(done: int, total: int | None) -> None:
        if not bars:
            bars.append(ProgressBar(total, description, unit="B", enabled=enabled).__enter__())
        bars[0].update(done, total)

    try:
        yield progress
    finally:
        if bars:
            bars[0].__exit__(None, None, None)


def downloads(enabled: bool):
    """A `download(filename)` context for the core: a byte bar that opens only if a download happens."""
    return lambda filename: byte_progress(f"downloading {filename}", enabled=enabled)


class TrainProgress:
    """Renders trainer events: the start-up table, a bar with loss, img/s and an ETA that counts the evaluations
    still due, a second bar while an evaluation samples and scores, and one line per checkpoint, evaluation and
    warning."""

    def __init__(self, config, console: Console, quiet: bool):  # config: a ditcli.training.config.TrainConfig
        self.config, self.quiet = config, quiet
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[count]}"), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"), console=console,
                                 disable=quiet)
        self.task = self.eval_task = None
        self.started, self.last_step, self.last_checkpoint = time.monotonic(), {}, None
        self.eval_seconds: list[float] = []  # each evaluation's, for the ETA
        self.stage, self.stage_started = None, 0.0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if self.task is not None and exc_type is not None:
            discard_live(self.progress)  # the error's one line is all that should remain
        elif self.task is not None:
            self.progress.stop()

    def final_line(self, result: dict) -> str:
        """One line summing up a finished run: steps, time, last loss, skipped steps, the checkpoint to use."""
        minutes, seconds = divmod(round(time.monotonic() - self.started), 60)
        loss = f", last loss {self.last_step['loss']:.4f}" if "loss" in self.last_step else ""
        where = self.last_checkpoint or result["out"]
        return (f"done: {self.config.model} trained to step {result['step']:,}/{self.config.steps:,} in "
                f"{minutes}m{seconds:02d}s{loss}, {result['bad_steps']} skipped steps; weights in {where}")

    def on_event(self, kind: str, data: dict):
        if kind == "start":
            self.show_summary(data)
            self.progress.start()
            self.task = self.progress.add_task("train", total=data["steps"], completed=data["start_step"],
                                               count=f"step {data['start_step']}/{data['steps']}", info="", eta="-")
        elif kind == "step":
            self.last_step = data
            if self.task is not None:
                self.progress.update(self.task, completed=data["step"], eta=self.eta(data),
                                     count=f"step {data['step']}/{self.config.steps}",
                                     info=f"loss {data['loss']:.4f} {data['img_per_s']:.1f} img/s")
        elif kind in ("eval_start", "eval_progress", "eval"):
            self.on_eval(kind, data)
        elif kind == "stop" and not self.quiet:
            if self.task is not None:  # the bar moves only every --log-every steps
                self.progress.update(self.task, completed=data["step"], count=f"step {data['step']}/"
                                                                               f"{self.config.steps}")
            self.progress.console.print(f"stop requested: every rank stops after step {data['step']}")
        if kind == "checkpoint":
            self.last_checkpoint = data["path"]
        if kind in ("checkpoint", "sample", "resume", "cache", "warning", "skip") and not self.quiet:
            message = data.get("message") or f"{kind}: {data.get('path', '')} (step {data.get('step')})"
            self.progress.console.print(message, soft_wrap=True, highlight=False)

    def on_eval(self, kind: str, data: dict):
        """An evaluation: its line when it starts, a second bar per stage (sampling, reference, samples), the
        result line when it ends."""
        if kind == "eval_start" and not self.quiet:
            self.progress.console.print(f"eval: step {data['step']}, {data['num']:,} images ({data['sampler']}, "
                                        f"{data['steps']} steps, cfg {data['cfg']:g}) scored in {data['features']} "
                                        "features", highlight=False)
        elif kind == "eval_progress":
            self.show_stage(data)
        elif kind == "eval":
            self.eval_seconds.append(data["eval_seconds"])
            if self.eval_task is not None:
                self.progress.remove_task(self.eval_task)
                self.eval_task = None
            if not self.quiet:
                kid = "" if data.get("kid") is None else f", KID {data['kid']:.4g}"
                self.progress.console.print(f"eval: step {data['step']}, FD {data['fd']:.4g}{kid} ({data['eval_num']} "
                                            f"images, {data['eval_features']} features, {data['eval_seconds']:.0f} s)",
                                            highlight=False)

    def show_stage(self, data: dict):
        """The evaluation's bar: this stage's images done, and its own ETA."""
        description = f"eval {data['stage']}"
        if self.eval_task is None:
            self.eval_task = self.progress.add_task(description, total=data["total"], count="", info="", eta="-")
        if (data["stage"], data["step"]) != self.stage or data["done"] == 0:
            self.stage, self.stage_started = (data["stage"], data["step"]), time.monotonic()
        elapsed = time.monotonic() - self.stage_started
        left = (data["total"] - data["done"]) * elapsed / data["done"] if data["done"] else None
        self.progress.update(self.eval_task, description=description, total=data["total"], completed=data["done"],
                             count=f"{data['done']:,}/{data['total']:,}", info=f"(step {data['step']})",
                             eta=clock(left))

    def eta(self, step: dict) -> str:
        """Time left: the steps at the run's img/s (which leaves evaluations out) plus the evaluations still due
        at the mean time of those done; "+ evals" until one has been timed."""
        if not step.get("img_per_s"):
            return "-"
        seconds = (self.config.steps - step["step"]) * self.config.global_batch / step["img_per_s"]
        evals = step.get("evals_left", 0)
        if evals and not self.eval_seconds:
            return f"{clock(seconds)} + evals"
        return clock(seconds + evals * (sum(self.eval_seconds) / len(self.eval_seconds) if evals else 0.0))

    def show_summary(self, data: dict):
        if self.quiet:
            return
        table = Table(title="dit train", show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")  # a long path wraps whole, not cut to "..."
        for key, value in data.items():
            if isinstance(value, float):
                text = f"{value:,.3f}"
            else:
                text = f"{value:,}" if isinstance(value, int) else str(value)
            table.add_row(key.replace("_", " "), text)
        self.progress.console.print(table)


def clock(seconds: float | None) -> str:
    """Seconds as h:mm:ss, as rich shows times; "-" when unknown."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class StageBars:
    """The core's progress(stage, done, total) callback as one bar per stage (reference, then samples)."""

    def __init__(self, enabled: bool):
        self.enabled, self.stage, self.bar = enabled, None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.bar = stage, ProgressBar(total, f"{stage:<9}", unit="img", enabled=self.enabled)
            self.bar.__enter__()
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.bar is not None:  # an error's one line is all that should remain
            self.bar.discard()
        self.close()
