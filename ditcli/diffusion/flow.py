"""Flow matching on the linear interpolant, the objective of SiT (Ma et al., 2024) and REPA (Yu et al., 2025).

x_t = alpha(t) x + sigma(t) eps with alpha + sigma = 1, and the model predicts the velocity dx_t/dt. The two projects
run time in opposite directions, and both are kept as data:
- "noise-to-data" (SiT): t = 0 is noise, t = 1 is data; x_t = t x + (1 - t) eps, velocity x - eps.
- "data-to-noise" (REPA, SD3): t = 0 is data, t = 1 is noise; x_t = (1 - t) x + t eps, velocity eps - x.
The network sees t itself, in [0, 1], with no x1000 scaling. `FlowMatching` is the flow counterpart of
`ditcli.diffusion.ddpm.Diffusion`: the same `draw_times`, `q_sample`, `training_losses`, `model_timesteps` and
`split_output`, so training never asks which objective it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ditcli.diffusion.ddpm import mean_flat
from ditcli.diffusion.process import predict_and_score
from ditcli.errors import UserValueError

TIME_DIRECTIONS = ("noise-to-data", "data-to-noise")
TIME_SAMPLINGS = ("uniform", "logit-normal")
# The largest time shift S, and 1 / S the smallest: beyond them fp32 times collapse onto the grid's ends (S = 1e300
# is infinite in fp32, and 1e-300 is 0), and a shift 1,000 times SD3's 3 has no use.
MAX_TIME_SHIFT = 1e3


def check_time_shift(shift: float, name: str = "time shift") -> None:
    """A time shift within [1 / MAX_TIME_SHIFT, MAX_TIME_SHIFT]: the one check of training's and sampling's."""
    if not (math.isfinite(shift) and 1 / MAX_TIME_SHIFT <= shift <= MAX_TIME_SHIFT):
        raise UserValueError(f"{name} must be a finite number in [{1 / MAX_TIME_SHIFT:g}, {MAX_TIME_SHIFT:g}], got "
                             f"{shift:g}", "1 leaves the times as they are; > 1 spends more of them at high noise")


def shift_noise_level(sigma: torch.Tensor | float, shift: float):
    """sigma' = S sigma / (1 + (S - 1) sigma): S > 1 spends more of the time at high noise (Eq. 23 of SD3)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass(frozen=True)
class FlowMatching:
    """The linear-interpolant flow of one time direction; `learn_sigma` models carry SiT's unused extra channels."""

    direction: str = "noise-to-data"
    learn_sigma: bool = False
    time_sampling: str = "uniform"
    time_shift: float = 1.0

    def __post_init__(self):
        if self.direction not in TIME_DIRECTIONS:
            raise UserValueError(f"unknown time direction {self.direction!r}",
                                 f"choose from {', '.join(TIME_DIRECTIONS)}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise UserValueError(f"unknown time sampling {self.time_sampling!r}",
                                 f"choose from {', '.join(TIME_SAMPLINGS)}")
        check_time_shift(self.time_shift)

    @property
    def data_time(self) -> float:
        """The time at which x_t is the data: where sampling ends."""
        return 1.0 if self.direction == "noise-to-data" else 0.0

    @property
    def noise_time(self) -> float:
        return 1.0 - self.data_time

    def noise_level(self, t):
        """sigma(t), the weight of the noise in x_t."""
        return 1 - t if self.direction == "noise-to-data" else t

    def time_at(self, sigma):
        """The time whose noise level is `sigma` (the inverse of `noise_level`)."""
        return 1 - sigma if self.direction == "noise-to-data" else sigma

    def draw_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Training times: uniform in [0, 1) as SiT, or logit-normal(0, 1) as SD3 and LightningDiT, then shifted."""
        if self.time_sampling == "uniform":
            t = torch.rand(batch, generator=generator)
        else:
            t = torch.sigmoid(torch.randn(batch, generator=generator))
        if self.time_shift == 1.0:
            return t
        return self.time_at(shift_noise_level(self.noise_level(t), self.time_shift))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x + sigma(t) eps on the linear path."""
        sigma = _broadcast(self.noise_level(t), x_start)
        return (1 - sigma) * x_start + sigma * noise

    def velocity(self, x_start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """dx_t/dt: x - eps for noise-to-data, eps - x for data-to-noise."""
        return x_start - noise if self.direction == "noise-to-data" else noise - x_start

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(velocity, SiT's unused 'sigma' channels or None)."""
        if self.learn_sigma:
            velocity, extra = model_output.chunk(2, dim=1)  # 2 x (N, C, H, W)
            return velocity, extra
        return model_output, None

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The network sees flow time itself."""
        return t

    def less_noisy(self, t: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
        """The time of noise level sigma(t) - amount, at least 0 (SRA's teacher time t - t_max u on REPA's path)."""
        return self.time_at((self.noise_level(t) - amount).clamp(min=0.0))

    def loss(self, net, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor,
             drop: torch.Tensor) -> dict:
        """One forward on x_t, scored against this process's target (ditcli.diffusion.process)."""
        return predict_and_score(self, net, x_start, t, noise, labels, drop)

    def training_losses(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                        t: torch.Tensor, noise: torch.Tensor) -> dict:
        """Per-sample velocity MSE (SiT's `training_losses`, REPA's denoising loss); extra channels get no loss."""
        velocity, _ = self.split_output(model_output)
        mse = mean_flat((velocity - self.velocity(x_start, noise)) ** 2)
        return {"loss": mse, "mse": mse}

    def score(self, x: torch.Tensor, t: float, velocity: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) from the velocity on the linear path: -eps_hat / sigma(t) (SiT's `get_score_from_velocity`)."""
        sigma = self.noise_level(t)
        noise = x + (1 - sigma) * velocity if self.direction == "data-to-noise" else x - (1 - sigma) * velocity
        return -noise / sigma

    def time_grid(self, steps: int, shift: float = 1.0, last_step: float = 0.0) -> list[float]:
        """The `steps + 1` times a fixed-step sampler visits, from noise to data, in float64.

        Evenly spaced in noise level, as SiT's and REPA's `linspace` grids (then `shift_noise_level`). With a
        `last_step` (SDE samplers) the even spacing stops at noise level `last_step` and one more step reaches the
        data: SiT's `last_step_size`, REPA's final step from 0.04 to 0.
        """
        if last_step > 0:
            levels = torch.linspace(1.0, last_step, steps, dtype=torch.float64).tolist() + [0.0]
        else:
            levels = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        return [float(self.time_at(shift_noise_level(sigma, shift))) for sigma in levels]


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))  # (N, 1, ..., 1)
