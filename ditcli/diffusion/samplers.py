"""Samplers with one contract, and the plans that choose one (its process, steps and NFE) for a sampler name.

Every sampler is `sample_<name>(model_fn, x, diffusion, noise_fn, callback=None) -> x_0`:
- `model_fn(x, index)` returns the raw model output (eps, then variance values when the model learns sigma)
  for respaced step indices `index` (N,) of `diffusion`;
- `x` is the starting noise;
- `diffusion` is the process: its betas, its respacing, and `Diffusion.split_output`, the one reader of the
  learned-variance channels;
- `noise_fn(like)` returns fresh Gaussian noise shaped like `like` (per-image generators, see
  `ditcli.diffusion.guidance.ImageNoise`); only stochastic steps draw from it (DDPM, DDIM with eta > 0), the ODE
  solvers never do;
- `callback(step, num_steps, x)` is called after each step.
Guidance lives in the `model_fn` adapters of `ditcli.diffusion.guidance`, not in the samplers; which samplers fit a
model is its objective's decision (`ditcli.diffusion.objectives`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ditcli.diffusion.ddpm import Diffusion
from ditcli.diffusion.flow import FlowMatching, check_time_shift
from ditcli.diffusion.flow_samplers import (
    TOLERANCES,
    sample_flow_dopri5,
    sample_flow_euler,
    sample_flow_heun,
    sample_flow_sde,
)
from ditcli.diffusion.guidance import GUIDED_CHANNELS, MAX_CFG, ModelFn, NoiseFn
from ditcli.diffusion.process import Process
from ditcli.errors import UserValueError

Callback = Callable[[int, int, torch.Tensor], None] | None


def step_indices(x: torch.Tensor, i: int) -> torch.Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


@torch.no_grad()
def sample_ddpm(model_fn: ModelFn, x: torch.Tensor, diffusion: Diffusion, noise_fn: NoiseFn,
                callback: Callback = None) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of DDPM, with the variance the model predicts (IDDPM)."""
    steps = diffusion.num_steps
    for step, i in enumerate(reversed(range(steps))):
        index = step_indices(x, i)
        out = diffusion.p_mean_variance(model_fn(x, index), x, index)
        x = out["mean"]
        if i > 0:
            x = x + torch.exp(0.5 * out["log_variance"]) * noise_fn(x)
        if callback is not None:
            callback(step, steps, x)
    return x


def sample_ddim(model_fn: ModelFn, x: torch.Tensor, diffusion: Diffusion, noise_fn: NoiseFn,
                callback: Callback = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM, Eq. 12 of Song et al. (2021); eta = 0 is deterministic, eta = 1 is DDPM-like."""
    ac, ac_prev = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
    steps = diffusion.num_steps
    with torch.no_grad():
        for step, i in enumerate(reversed(range(steps))):
            index = step_indices(x, i)
            out = diffusion.p_mean_variance(model_fn(x, index), x, index)
            sigma = eta * math.sqrt((1 - ac_prev[i]) / (1 - ac[i])) * math.sqrt(1 - ac[i] / ac_prev[i])
            x = out["pred_xstart"] * math.sqrt(ac_prev[i]) + math.sqrt(1 - ac_prev[i] - sigma ** 2) * out["eps"]
            if i > 0 and sigma > 0:
                x = x + sigma * noise_fn(x)
            if callback is not None:
                callback(step, steps, x)
    return x


SOLVERS = {
    "dpm++2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2)),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
SAMPLERS = ("ddpm", "ddim", *SOLVERS)
FLOW_SAMPLER_NAMES = ("euler", "heun", "dopri5", "sde")  # the keys of FLOW_SAMPLERS, below
FLOW_MAP = "flow-map"  # a mean-flow model's sampler: z_r = z_t - (t - r) u (ditcli.diffusion.flow_map)
MAX_STEPS = 10_000  # the most sampling steps, of `--steps` and of a file's record


@dataclass(frozen=True)
class SamplingDefaults:
    """A checkpoint's own recommended sampler, steps, guidance scale, guidance interval (training timesteps, or None
    to guide every step) and guided channels (None: not recorded, so "paper"); `dit sample` options override them."""

    sampler: str = "ddpm"
    steps: int = 250
    cfg: float = 4.0
    interval: tuple[float, float] | None = None
    channels: str | None = None

    def __post_init__(self):
        if (self.sampler not in (*SAMPLERS, *FLOW_SAMPLER_NAMES, FLOW_MAP) or not 1 <= self.steps <= MAX_STEPS
                or not 0 <= self.cfg <= MAX_CFG):
            raise UserValueError(f"unusable sampling defaults {self.sampler!r}, {self.steps} steps, cfg {self.cfg}",
                                 f"expected a known sampler, 1 to {MAX_STEPS:,} steps and cfg in [0, {MAX_CFG:g}]")
        if self.interval is not None and not (len(self.interval) == 2 and all(map(math.isfinite, self.interval))
                                              and 0 <= self.interval[0] <= self.interval[1]):
            raise UserValueError(f"unusable guidance interval {self.interval!r}",
                                 "expected [low, high], 0 <= low <= high")
        if self.channels is not None and self.channels not in GUIDED_CHANNELS:
            raise UserValueError(f"unknown guided channels {self.channels!r}",
                                 f"expected {' or '.join(GUIDED_CHANNELS)}")

    def to_dict(self) -> dict:
        """The record; an interval and channels only when set, so older files keep the exact keys they had."""
        data = {"sampler": self.sampler, "steps": self.steps, "cfg": self.cfg}
        if self.interval is not None:
            data["interval"] = list(self.interval)
        if self.channels is not None:
            data["channels"] = self.channels
        return data

    @classmethod
    def from_dict(cls, data: dict | None) -> SamplingDefaults | None:
        if not data:
            return None
        raw = data.get("interval")
        if raw is not None and len(raw) != 2:
            raise UserValueError(f"the interval needs two numbers, got {raw!r}")
        interval = None if raw is None else (float(raw[0]), float(raw[1]))
        channels = None if data.get("channels") is None else str(data["channels"])
        return cls(str(data["sampler"]), int(data["steps"]), float(data["cfg"]), interval, channels)


def make_scheduler(name: str, diffusion: Diffusion, steps: int):
    """A diffusers scheduler for solver `name`, built on this process's own betas."""
    import diffusers

    if len(diffusion.timesteps) < 2 or diffusion.timesteps[-1] != diffusion.num_steps - 1:
        raise ValueError(f"sampler {name!r} needs the unrespaced training process")
    class_name, options = SOLVERS[name]
    scheduler = getattr(diffusers, class_name)(num_train_timesteps=diffusion.num_steps,
                                               trained_betas=diffusion.betas.tolist(),
                                               prediction_type="epsilon", **options)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample_solver(model_fn: ModelFn, x: torch.Tensor, diffusion: Diffusion, noise_fn: NoiseFn,
                  callback: Callback = None, solver: str = "dpm++2m", steps: int = 25) -> torch.Tensor:
    """Drive diffusers' scheduler `solver` over `diffusion`'s betas in `steps` steps, with the eps of our model_fn.

    The solvers here are deterministic ODE solvers, so `noise_fn` is never drawn from. A fresh scheduler per call
    keeps one batch's multistep history and step counter from leaking into the next.
    """
    scheduler = make_scheduler(solver, diffusion, steps)
    scheduler.set_timesteps(steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for step, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(x, t)
        index = torch.full((x.shape[0],), float(t), device=x.device)
        eps, _ = diffusion.split_output(model_fn(model_input, index))  # the learned variance is not used
        x = scheduler.step(eps, t, x, return_dict=False)[0]
        if callback is not None:
            callback(step, len(timesteps), x)
    return x


@dataclass(frozen=True)
class SamplerPlan:
    """A ready sampler: the process it runs on, a function with the common contract, and its model evaluations.

    `process` is the model's objective (a `Diffusion`, respaced for DDPM and DDIM, or a `FlowMatching`). `nfe` is
    per image: one per step, except Heun's; a doubled CFG batch counts once; None for an adaptive solver, whose
    count is known only once it has run.
    """

    name: str
    steps: int
    process: Process
    sample: Callable
    nfe: int | None


def plan_sampler(name: str, steps: int, learn_sigma: bool, eta: float = 0.0, respacing: str | None = None,
                 schedule: str = "linear") -> SamplerPlan:
    """Choose the process and function for `--sampler name --steps steps`."""
    if name == FLOW_MAP:
        raise UserValueError(f"sampler {name!r} samples mean-flow models, and this is a DDPM model",
                             f"choose from {', '.join(SAMPLERS)}")
    if name not in SAMPLERS:
        raise UserValueError(f"unknown sampler {name!r}", f"choose from {', '.join(SAMPLERS)}")
    if steps < 1:
        raise UserValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= eta <= 1.0:  # beyond 1 the DDIM step takes the square root of a negative number
        raise UserValueError(f"eta must be in [0, 1], got {eta}", "0 is deterministic DDIM, 1 DDPM-like")
    if name in SOLVERS:
        diffusion = Diffusion.create("", schedule, learn_sigma)
        nfe = len(make_scheduler(name, diffusion, steps).timesteps)
        return SamplerPlan(name, steps, diffusion, partial(sample_solver, solver=name, steps=steps), nfe)
    if respacing is None:
        respacing = f"ddim{steps}" if name == "ddim" and _ddim_spacing_exists(steps) else str(steps)
    diffusion = Diffusion.create(respacing, schedule, learn_sigma)
    if name == "ddpm":
        return SamplerPlan(name, diffusion.num_steps, diffusion, sample_ddpm, diffusion.num_steps)
    return SamplerPlan(name, diffusion.num_steps, diffusion, partial(sample_ddim, eta=eta), diffusion.num_steps)


FLOW_SAMPLERS = {"euler": sample_flow_euler, "heun": sample_flow_heun, "dopri5": sample_flow_dopri5,
                 "sde": sample_flow_sde}


@dataclass(frozen=True)
class FlowSettings:
    """What a flow sampler takes besides its steps: the time shift of its grid, dopri5's tolerances (SiT's
    defaults) and the SDE's last, noise-free step (SiT's `last_step_size`)."""

    shift: float = 1.0
    atol: float = 1e-6
    rtol: float = 1e-3
    last_step: float = 0.04

    def __post_init__(self):
        check_time_shift(self.shift)
        low, high = TOLERANCES
        if not all(math.isfinite(v) and low <= v <= high for v in (self.atol, self.rtol)):
            raise UserValueError(f"atol and rtol must be finite numbers in [{low:g}, {high:g}], got {self.atol:g} and "
                                 f"{self.rtol:g}", "SiT samples at atol 1e-6, rtol 1e-3")
        if not 0 < self.last_step < 1:
            raise UserValueError(f"the SDE's last step must be in (0, 1), got {self.last_step:g}")


def plan_flow_sampler(name: str, steps: int, flow: FlowMatching, settings: FlowSettings = FlowSettings()
                      ) -> SamplerPlan:
    """Choose the function for `--sampler name --steps steps` on a flow-matching model; dopri5 ignores the steps."""
    if name not in FLOW_SAMPLERS:
        what = ("samples DDPM models, and this is a flow-matching model" if name in SAMPLERS else
                "samples mean-flow models, and this is a flow-matching model" if name == FLOW_MAP else "is unknown")
        raise UserValueError(f"sampler {name!r} {what}", f"choose from {', '.join(FLOW_SAMPLERS)}")
    if steps < 1:
        raise UserValueError(f"steps must be >= 1, got {steps}")
    if name == "dopri5":
        sample = partial(sample_flow_dopri5, atol=settings.atol, rtol=settings.rtol)
        return SamplerPlan(name, steps, flow, sample, None)
    extra = {"last_step": settings.last_step} if name == "sde" else {}
    sample = partial(FLOW_SAMPLERS[name], steps=steps, shift=settings.shift, **extra)
    return SamplerPlan(name, steps, flow, sample, 2 * steps if name == "heun" else steps)


# The settings each sampler reads besides the model and the noise. One that a sampler does not read is refused where
# it is given, never recorded as if it had been used: dopri5 picks its own steps to meet its tolerances and ignores
# the grid's shift; only DDIM takes an eta; only dopri5 has tolerances.
SAMPLER_SETTINGS = {**{name: ("steps",) for name in SAMPLERS}, "ddim": ("steps", "eta"),
                    **{name: ("steps", "time-shift") for name in ("euler", "heun", "sde", FLOW_MAP)},
                    "dopri5": ("atol", "rtol")}


def check_sampler_settings(sampler: str, given: dict[str, str], sampler_flag: str = "--sampler") -> None:
    """Refuse a setting in `given` (setting -> the option the user gave it as) that `sampler` does not read."""
    for setting, flag in given.items():
        if setting in SAMPLER_SETTINGS.get(sampler, (setting,)):
            continue
        if setting == "steps":
            raise UserValueError(f"{sampler_flag} {sampler} does not take {flag}: it chooses its own steps to meet "
                                 "its tolerances", f"drop {flag}, or pass a fixed-step {sampler_flag}")
        takers = [name for name, settings in SAMPLER_SETTINGS.items() if setting in settings]
        named = " or ".join(takers) if len(takers) < 3 else f"{', '.join(takers[:-1])} or {takers[-1]}"
        raise UserValueError(f"{flag} only applies to {sampler_flag} {named}, and this run uses {sampler}",
                             f"add {sampler_flag} {takers[0]}, or drop {flag}" if len(takers) == 1 else
                             f"drop {flag}, or pass {sampler_flag} {takers[0]}")


def _ddim_spacing_exists(steps: int) -> bool:
    try:
        Diffusion.create(f"ddim{steps}")
    except ValueError:
        return False
    return True


