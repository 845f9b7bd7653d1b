"""Samplers for flow-matching models, on the contract of `ditcli.diffusion.samplers`.

Every sampler is `sample_<name>(model_fn, x, flow, noise_fn, callback=None, **settings) -> x_data`:
- `model_fn(x, t)` returns the raw model output for flow times `t` (N,), in the model's own time direction; the
  velocity is `flow.split_output(out)[0]`. A sampler that evaluates a step at several times passes the step's start
  as `model_fn(x, t, step_time)`, so a guidance interval is decided once per step (REPA's rule);
- `flow` is the `FlowMatching` the model was trained with: its time grid, direction and score;
- `noise_fn(like)` gives fresh Gaussian noise; only the SDE sampler draws from it;
- `callback(step, num_steps, x)` is called after each step (the adaptive solver, after each accepted step, with
  num_steps 0: not known in advance).
The state is float32 and time is float64 until it is handed to the model in float32.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ditcli.diffusion.flow import FlowMatching
from ditcli.errors import UserValueError

ModelFn = Callable[..., torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None] | None

MAX_ADAPTIVE_STEPS = 10_000  # a dopri5 run that needs more is not converging at these tolerances
# dopri5's atol and rtol, lowest and highest: below, an fp32 state's round-off alone exceeds the tolerance (1e-300 is
# 0 in fp32, and err / 0 rejects every step); above 1, no step is ever rejected.
TOLERANCES = (1e-10, 1.0)
MIN_STEP = 1e-9  # the smallest dopri5 step, as a share of the time from noise to data: a smaller one cannot converge


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


# Dormand-Prince 5(4) (Dormand & Prince, 1980) as torchdiffeq's `dopri5` runs it, the solver of SiT's sample_ode:
# nodes, stage weights, the 5th-order weights (also the last stage's inputs), the error weights b - b*, and the
# weights of the midpoint used by the dense output.
DOPRI_NODES = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI_STAGES = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DOPRI_ERROR = tuple(b - b_star for b, b_star in zip(
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    (1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60)))
DOPRI_MIDPOINT = tuple(m / 2 for m in (6025192743 / 30085553152, 0.0, 51252292925 / 65400821598,
                                       -2691868925 / 45128329728, 187940372067 / 1594534317056,
                                       -1776094331 / 19743644256, 11237099 / 235043384))
SAFETY, MAX_GROWTH, MAX_SHRINK = 0.9, 10.0, 0.2


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def combine(x: torch.Tensor, slopes: list[torch.Tensor], weights: tuple[float, ...], h: float) -> torch.Tensor:
    """x + h * sum_i w_i k_i, skipping zero weights."""
    out = x
    for k, w in zip(slopes, weights):
        if w != 0.0:
            out = out + (h * w) * k
    return out


def below(t: float) -> float:
    """The float32 time just below `t`: torchdiffeq evaluates the stages that sit on a step's end there."""
    value = torch.tensor(t, dtype=torch.float32)
    return float(torch.nextafter(value, value - 1))


def initial_step(f, t0: float, x0: torch.Tensor, f0: torch.Tensor, direction: float, atol: float,
                 rtol: float) -> float:
    """The first step size by Hairer, Norsett & Wanner's rule (Solving ODEs I, Sec. II.4), for a 5(4) pair."""
    scale = atol + rtol * x0.abs()
    d0, d1 = rms(x0 / scale), rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = f(x0 + (direction * h0) * f0, t0 + direction * h0)
    d2 = rms((f1 - f0) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1)


def dopri_step(f, t0: float, x0: torch.Tensor, f0: torch.Tensor, h: float):
    """One Dormand-Prince step of signed size h: (x1, the 7 slopes, the error estimate)."""
    slopes = [f0]
    for node, weights in zip(DOPRI_NODES, DOPRI_STAGES):
        t = below(t0 + h) if node == 1.0 else t0 + node * h
        slopes.append(f(combine(x0, slopes, weights, h), t))
    x1 = combine(x0, slopes[:6], DOPRI_STAGES[-1], h)  # the 5th-order solution, the last stage's input
    error = combine(torch.zeros_like(x0), slopes, DOPRI_ERROR, h)
    return x1, slopes, error


def dense_output(x0: torch.Tensor, x1: torch.Tensor, slopes: list[torch.Tensor], h: float, s: float) -> torch.Tensor:
    """The state at fraction s of a step: the quartic through x0, the Dormand-Prince midpoint and x1 with the end
    slopes h k_1 and h k_7 (Hairer, Norsett & Wanner, Sec. II.6)."""
    mid = combine(x0, slopes, DOPRI_MIDPOINT, h)
    d0, d1 = h * slopes[0], h * slopes[-1]
    # p(s) = x0 + d0 s + c2 s^2 + c3 s^3 + c4 s^4, solved from p(1/2) = mid, p(1) = x1, p'(1) = d1.
    c4 = 2 * (d1 - d0) - 8 * (x1 + x0) + 16 * mid
    c3 = (5 * d0 - 3 * d1) + 18 * x0 + 14 * x1 - 32 * mid
    c2 = (d1 - 4 * d0) - 11 * x0 - 5 * x1 + 16 * mid
    return x0 + s * (d0 + s * (c2 + s * (c3 + s * c4)))


@torch.no_grad()
def sample_flow_dopri5(model_fn: ModelFn, x: torch.Tensor, flow: FlowMatching, noise_fn=None,
                       callback: Callback = None, atol: float = 1e-6, rtol: float = 1e-3) -> torch.Tensor:
    """Adaptive Dormand-Prince 5(4) from noise to data, as SiT's default `sample_ode` (torchdiffeq's dopri5).

    The error ratio of a step is the RMS over the whole batch of err / (atol + rtol max(|x0|, |x1|)); steps with a
    ratio <= 1 are accepted; the next size is h min(10, max(0.9 ratio^(-1/5), f)) with f = 1 after an accepted step
    and 0.2 after a rejected one. Like torchdiffeq it steps past the end and reads the end state from the dense
    output. The number of evaluations is the caller's to count (`CountingModelFn`).
    """
    velocity = velocity_fn(model_fn, flow)
    start, end = flow.noise_time, flow.data_time
    direction = 1.0 if end > start else -1.0
    t, f0 = start, velocity(x, start)
    h = direction * initial_step(velocity, t, x, f0, direction, atol, rtol)
    for step in range(MAX_ADAPTIVE_STEPS):
        x1, slopes, error = dopri_step(velocity, t, x, f0, h)
        ratio = rms(error / (atol + rtol * torch.maximum(x.abs(), x1.abs())))
        accepted = ratio <= 1
        if accepted:
            if direction * (t + h - end) >= 0:  # this step covers the end: read it off the dense output
                return dense_output(x, x1, slopes, h, (end - t) / h)
            t, x, f0 = t + h, x1, slopes[-1]
            if callback is not None:
                callback(step, 0, x)  # 0: the number of steps is not known in advance
        factor = MAX_GROWTH if ratio == 0 else min(MAX_GROWTH, max(SAFETY * ratio ** -0.2,
                                                                    1.0 if ratio < 1 else MAX_SHRINK))
        h = h * factor
        if abs(h) < MIN_STEP * abs(end - start):
            raise UserValueError(f"dopri5's step fell below {MIN_STEP:g} of the way from noise to data at atol "
                                 f"{atol:g}, rtol {rtol:g}: the model's velocity is not smooth enough for them",
                                 "loosen the tolerances or use a fixed-step sampler")
    raise UserValueError(f"dopri5 did not reach the data in {MAX_ADAPTIVE_STEPS} steps at atol {atol:g}, rtol {rtol:g}",
                         "loosen the tolerances or use a fixed-step sampler")
