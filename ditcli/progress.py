"""The one place that turns progress callbacks into rich bars; core modules only call back.

    with ProgressBar(total=64, description="sampling", unit="img") as bar:
        for batch in generate_images(...):      # the core calls bar.substatus("step 3/25") per step
            bar.advance(len(batch.indices))

A disabled bar (not a terminal, --json, or a non-zero rank) accepts the same calls and draws nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)
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
        """A denoising-step callback: shows "step i/n"."""
        self.substatus(f"step {step + 1}/{num_steps}")

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
