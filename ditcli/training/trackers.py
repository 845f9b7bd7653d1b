"""Experiment trackers for `dit train --log`: TensorBoard and Weights & Biases, beside the metrics.jsonl every run writes.

Only rank 0 opens trackers. A resumed run continues the same curves from the step it resumes at:
- TensorBoard is reopened with `purge_step`, so points an interrupted run logged after its last checkpoint are
  dropped by every event reader;
- W&B resumes the same run id, kept in the run folder. Points it already has at later steps are logged again with
  the same values, because resume is bit-exact.
Nothing here prints.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

from ditcli.errors import UserError

TRACKERS = ("jsonl", "tensorboard", "wandb")
SCALARS = ("loss", "mse", "vb", "grad_norm", "lr", "img_per_s", "bad_steps", "skipped", "fd", "kid", "eval_seconds")
WANDB_ID_FILE = "wandb-run-id.txt"


def check_trackers(names: tuple[str, ...]) -> None:
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"unknown --log {name!r}", f"choose from {', '.join(TRACKERS)} (repeat --log for several)")


def check_packages(names: tuple[str, ...]) -> None:
    """Every tracker named, and its package importable: checked before a run touches its folder."""
    check_trackers(names)
    for name in names:
        if name != "jsonl":
            require(name, name)


def require(module: str, extra: str):
    """Import an optional tracker package, or one line naming the pip command."""
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"--log {extra} needs the {module} package, which is not installed",
                        f"pip install 'ditcli[{extra}]'") from None


class TensorBoard:
    """Scalars under train/, the EMA preview grid as an image, the config as text and hyperparameters."""

    def __init__(self, folder: Path, start_step: int, config: dict):
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # Points from step start_step + 1 on, logged by a run that stopped after its checkpoint, are dropped.
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step > 0 else None)
        if start_step == 0:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()}
            for summary in hparams(flat, {"train/loss": float("nan")}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```")

    def scalars(self, step: int, values: dict, group: str) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def image(self, step: int, name: str, pixels: np.ndarray) -> None:
        self.writer.add_image(name, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """One W&B run per run folder (its id kept there); `WANDB_MODE=offline` works as W&B defines it."""

    def __init__(self, folder: Path, start_step: int, config: dict):
        self.wandb = require("wandb", "wandb")
        id_file = folder / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = self.wandb.init(id=run_id, resume="allow", dir=str(folder), config=config,
                                   name=Path(config.get("out", "run")).name)

    def scalars(self, step: int, values: dict, group: str) -> None:
        self.run.log({f"{group}/{k}": v for k, v in values.items()}, step=step)

    def image(self, step: int, name: str, pixels: np.ndarray) -> None:
        self.run.log({name: self.wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of one run; metrics.jsonl is written by the trainer itself, so `jsonl` opens nothing here."""

    def __init__(self, names: tuple[str, ...], out: Path, start_step: int, config: dict, rank: int = 0):
        """Every rank checks that the packages import (so all fail alike); rank 0 alone opens the trackers."""
        check_packages(names)
        self.open = []
        if rank != 0:
            return
        if "tensorboard" in names:
            self.open.append(TensorBoard(out / "tensorboard", start_step, config))
        if "wandb" in names:
            self.open.append(Wandb(out, start_step, config))

    def scalars(self, step: int, record: dict, group: str = "train") -> None:
        """The known scalars of a metrics.jsonl record, under `group/` (train/loss, eval/fd)."""
        values = {k: float(record[k]) for k in SCALARS if isinstance(record.get(k), (int, float))}
        for tracker in self.open:
            tracker.scalars(step, values, group)

    def image(self, step: int, name: str, path: Path) -> None:
        if not self.open:
            return
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3)
        for tracker in self.open:
            tracker.image(step, name, pixels)

    def close(self) -> None:
        for tracker in self.open:
            tracker.close()
        self.open = []
