"""Samplers for flow-matching models, on the contract of `ditcli.samplers`.

Every sampler is `sample_<name>(model_fn, x, flow, noise_fn, callback=None, **settings) -> x_data`:
- `model_fn(x, t)` returns the raw model output for flow times `t` (N,), in the model's own time direction; the
  velocity is `flow.split_output(out)[0]`. A sampler that evaluates a step at several times passes the step's start
  as `model_fn(x, t, step_time)`, so a guidance interval is decided once per step (REPA's rule);
- `flow` is the `FlowMatching` the model was trained with: its time grid, direction and score;
- `noise_fn(like)` gives fresh Gaussian noise; only the SDE sampler draws from it;
- `callback(step, num_steps, x)` is called after each step (the adaptive solver reports accepted steps against an
  estimate that grows as it goes).
The state is float32 and time is float64 until it is handed to the model in float32.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ditcli.flow import FlowMatching

ModelFn = Callable[..., torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None] | None

MAX_ADAPTIVE_STEPS = 10_000  # a dopri5 run that needs more is not converging at these tolerances


def times_like(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)


def velocity_fn(model_fn: ModelFn, flow: FlowMatching) -> Callable:
    """v(x, t[, step_time]): the velocity channels of the model output at the float time t."""
    def velocity(x: torch.Tensor, t: float, step_time: float | None = None) -> torch.Tensor:
        args = (x, times_like(x, t)) if step_time is None else (x, times_like(x, t), times_like(x, step_time))
        return flow.split_output(model_fn(*args))[0].float()

    return velocity


@torch.no_grad()
def sample_flow_euler(model_fn: ModelFn, x: torch.Tensor, flow: FlowMatching, noise_fn=None, callback: Callback = None,
                      steps: int = 50, shift: float = 1.0) -> torch.Tensor:
    """Euler's method on dx/dt = v(x, t) over `flow.time_grid` (SiT's `euler`, REPA's `euler_sampler`)."""
    velocity, grid = velocity_fn(model_fn, flow), flow.time_grid(steps, shift)
    for step, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        x = x + (t_next - t_cur) * velocity(x, t_cur)
        if callback is not None:
            callback(step, steps, x)
    return x


@torch.no_grad()
def sample_flow_heun(model_fn: ModelFn, x: torch.Tensor, flow: FlowMatching, noise_fn=None, callback: Callback = None,
                     steps: int = 25, shift: float = 1.0, final_correction: bool = True) -> torch.Tensor:
    """Heun's method (explicit trapezoid): 2 evaluations a step.

    final_correction: True corrects every step, as torchdiffeq's `heun2` in SiT's sampler (2 x steps evaluations);
        False leaves the last step as a plain Euler step, as REPA's `euler_sampler(heun=True)` and EDM do
        (2 x steps - 1), kept for parity with REPA's numbers.
    """
    velocity, grid = velocity_fn(model_fn, flow), flow.time_grid(steps, shift)
    for step, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t_cur
        d = velocity(x, t_cur)
        x_next = x + dt * d
        if final_correction or step < steps - 1:
            x_next = x + dt * (0.5 * d + 0.5 * velocity(x_next, t_next, t_cur))
        x = x_next
        if callback is not None:
            callback(step, steps, x)
    return x


@torch.no_grad()
def sample_flow_sde(model_fn: ModelFn, x: torch.Tensor, flow: FlowMatching, noise_fn=None, callback: Callback = None,
                    steps: int = 250, shift: float = 1.0, last_step: float = 0.04) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE dx = [v + w s] dt + sqrt(2 w) dW with w(t) = sigma(t), the noise level.

    This is SiT's `sample_sde` with diffusion form "sigma" and norm 1, and REPA's `euler_maruyama_sampler` (its
    g(t) = 2t is the same SDE in its reversed time). `steps - 1` stochastic steps reach noise level `last_step`; the
    last step takes the drift alone (SiT's last step "Mean"). One model evaluation per step: SiT evaluates the same
    input twice per step (velocity, then score) and counts 2.
    """
    velocity, grid = velocity_fn(model_fn, flow), flow.time_grid(steps, shift, last_step)
    for step, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t_cur
        w = float(flow.noise_level(t_cur))
        v = velocity(x, t_cur)
        x = x + dt * v + (w * abs(dt)) * flow.score(x, t_cur, v)
        if step < steps - 1:
            x = x + math.sqrt(2 * w * abs(dt)) * noise_fn(x)
        if callback is not None:
            callback(step, steps, x)
    return x
