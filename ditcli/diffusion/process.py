"""The contract of a training process: what training and the samplers call, whichever objective trained the model.

`Diffusion` (DDPM's discrete process) and `FlowMatching` (the linear-interpolant flow) both satisfy it; the objective
adapters of `ditcli.diffusion.objectives` build them. Code that holds a process types it as `Process` and never asks
which one it is.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TrainingNet(Protocol):
    """The network as a training step calls it: the run's precision, data parallelism and compilation applied. A run
    that aligns representations reads the tokens its last differentiable forward tapped from `taps` afterwards; no
    process needs them."""

    taps: list[torch.Tensor] | None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor,
                 r: torch.Tensor | None = None) -> torch.Tensor:
        """The differentiable forward (through DDP, so gradients are synchronised)."""

    def evaluate(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor,
                 r: torch.Tensor | None = None) -> torch.Tensor:
        """A forward without gradients (targets, guidance)."""

    def jvp(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor,
            tangents: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, du) of u(x, t, r) along tangents (dx, dt, dr), without gradients: forward-mode AD on the unwrapped
        module through the math attention kernel."""

    def teach(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's output (`--teacher`, for `--train-guidance distill`), without gradients."""


class Process(Protocol):
    """One objective's forward process, its loss and the time the network sees."""

    learn_sigma: bool

    def loss(self, net: TrainingNet, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             labels: torch.Tensor, drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample loss terms of one micro-batch; "loss" is the one trained."""

    def draw_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Training times of a batch, from `generator` only."""

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The noised input x_t."""

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The time input of the network for process times (or respaced indices) `t`."""

    def less_noisy(self, t: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
        """Per row, the time (as `q_sample` takes it) whose noise is lower than that of the training time `t` by
        `amount`, a share of the whole noise range, stopping at the data: the EMA teacher's time of SRA."""

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prediction and, for a learned-sigma model, its extra channels."""


def predict_and_score(process, net: TrainingNet, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      labels: torch.Tensor, drop: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss of a process whose target needs no network (DDPM, flow): noise x_0 to x_t, predict once, and score
    the output with the process's `training_losses(model_output, x_start, x_t, t, noise)`."""
    x_t = process.q_sample(x_start, t, noise)
    out = net(x_t, t, labels, drop)
    return process.training_losses(out.float(), x_start, x_t, t, noise)
