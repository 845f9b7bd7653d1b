"""The network as a training step calls it (`ditcli.diffusion.process.TrainingNet`): the differentiable forward
through DDP (and `--compile`) under the run's autocast, a forward without gradients, and the JVP a mean-flow target
needs.

With representation alignment the forward module is the DiT with its heads (`ditcli.training.align.TapNet`), which
also returns the tokens of the tapped blocks: the net keeps them as `taps`, for the trainer to add the alignment
terms once the objective has its loss; the objectives never see them.

The JVP runs on the unwrapped module under `no_grad`: forward-mode AD cannot pass through a DDP wrapper (whose hooks
belong to the backward pass), and running the differentiable forward outside DDP would skip the gradient sync. The
fused attention kernels have no forward-mode rule, so the JVP alone uses the math kernel; the forward keeps the
fused one.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditcli.runtime import autocast


class RunNet:
    """`forward`: the DDP-wrapped (maybe compiled) model; `module`: the model itself. `tapped`: the forward returns
    (output, taps), and `taps` keeps those of the last differentiable forward. `teacher`: a frozen flow model whose
    velocity is a distilled target (`--teacher`), or None."""

    def __init__(self, forward: torch.nn.Module, module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 tapped: bool = False, teacher: torch.nn.Module | None = None):
        self.forward, self.module, self.device, self.dtype, self.tapped = forward, module, device, dtype, tapped
        self.teacher = teacher
        self.taps: list[torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor,
                 r: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            out = self.forward(x, t, y, drop_mask) if r is None else self.forward(x, t, y, drop_mask, r=r)
        if self.tapped:
            out, self.taps = out
        return out

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor,
                 r: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return self.module(x, t, y, drop_mask, r=r).float()

    @torch.no_grad()
    def teach(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("this run has no teacher: --train-guidance distill needs --teacher")
        with autocast(self.device, self.dtype):
            return self.teacher(x, t, y, drop_mask).float()

    @torch.no_grad()
    def jvp(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor,
            tangents: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        def u(x_: torch.Tensor, t_: torch.Tensor, r_: torch.Tensor) -> torch.Tensor:
            return self.module(x_, t_, y, drop_mask, r=r_)

        with autocast(self.device, self.dtype), sdpa_kernel(SDPBackend.MATH):
            out, du = torch.func.jvp(u, (x, t, r), tangents)
        return out.float(), du.float()
