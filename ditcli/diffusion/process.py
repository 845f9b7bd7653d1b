"""The contract of a training process: what training and the samplers call, whichever objective trained the model.

`Diffusion` (DDPM's discrete process) and `FlowMatching` (the linear-interpolant flow) both satisfy it; the objective
adapters of `ditcli.diffusion.objectives` build them. Code that holds a process types it as `Process` and never asks
which one it is.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Process(Protocol):
    """One objective's forward process, its loss and the time the network sees."""

    learn_sigma: bool

    def draw_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Training times of a batch, from `generator` only."""

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The noised input x_t."""

    def training_losses(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample loss terms; "loss" is the one trained."""

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The time input of the network for process times (or respaced indices) `t`."""

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prediction and, for a learned-sigma model, its extra channels."""
