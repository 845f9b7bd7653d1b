"""Mean flows: a network u(z_t, t, r) that predicts the average velocity over [r, t] on the linear path, so that one
step z_r = z_t + (r - t) u jumps along the flow (MeanFlow, Geng et al., 2025; Decoupled MeanFlow, Lee et al., 2025).

Training regresses u onto the target of the MeanFlow identity, u_tgt = v - (t - r) du/dt (Eq. 6 of MeanFlow), where
du/dt is the total derivative along the flow (tangents dz = v, dt = 1, dr = 0), taken by forward-mode AD. Guidance is
trained in: v is replaced by a guided velocity v_g built from the network's own instantaneous velocity (r = t).
Times follow the path `FlowMatching`: t is the noisier time, r the cleaner, in either direction.

Where the reference codes differ, this module follows the official MeanFlow code (Gsunshine/meanflow, JAX, and
Gsunshine/py-meanflow) and does not copy these defects (tests/golden-meanflow/README.md, Section 9):
- zhuyu-cs/MeanFlow's adaptive weight is L^2 / sg(L^2 + 1e-3)^p; its gradient is about twice the official
  L / sg(L + c)^p, which is what `adaptive_loss` computes.
- zhuyu-cs's defaults draw r != t on 75 % of the rows although its README and the paper use 25 %; the default here is
  `interval_ratio=0.25`.
- zhuyu-cs runs `torch.func.jvp` on the DDP-wrapped model; the JVP here goes through `TrainingNet.jvp` (the unwrapped
  module, no gradients) and the gradient only through the differentiable forward.
Decoupled MeanFlow's own objective (a flow-matching term plus a learned log-variance weighting) is not implemented;
its MeanFlow term here is trained with the official adaptive weight. Its two targets are: model guidance (the
network's own u_cond - u_uncond) and distillation (a frozen flow teacher's guided velocity, `TrainedGuidance` form
"distill").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ditcli.diffusion.flow import FlowMatching
from ditcli.diffusion.process import TrainingNet

GUIDANCE_FORMS = ("meanflow", "model", "distill")


@dataclass(frozen=True)
class TrainedGuidance:
    """Guidance trained into the target velocity, applied where t lies in `interval` (the model's own time).

    form "meanflow": v_g = omega v + kappa u_cond + (1 - omega - kappa) u_uncond (MeanFlow Sec. 4.2, with its kappa).
    form "model": v_g = v + omega (u_cond - u_uncond) (the model guidance of Decoupled MeanFlow); kappa must be 0.
    u_cond and u_uncond are the network's instantaneous velocities (r = t) with the row's label and the null label.
    form "distill": v_g = T_uncond + omega (T_cond - T_uncond) in the interval and T_cond outside it, where T is a
    frozen flow model, the teacher (DMF's `g-type distill`); a dropped label's row gets T_uncond. The sample's own
    velocity v is not used: the target is the teacher's field, deterministic given (z_t, t, label).
    """

    form: str = "meanflow"
    omega: float = 1.0
    kappa: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        checks = [
            (self.form in GUIDANCE_FORMS,
             f"guidance form must be one of {', '.join(GUIDANCE_FORMS)}, got {self.form!r}"),
            (math.isfinite(self.omega) and math.isfinite(self.kappa),
             f"guidance omega and kappa must be finite, got {self.omega}, {self.kappa}"),
            (self.form == "meanflow" or self.kappa == 0.0,
             f"{self.form} guidance has no kappa, got {self.kappa}"),
            (self.form != "distill" or self.omega >= 0.0,
             f"distilled guidance needs omega >= 0 (the teacher's guidance scale), got {self.omega}"),
            (self.form != "model" or 0.0 <= self.omega < 1.0,
             f"model guidance needs 0 <= omega < 1 (its trained scale is 1 / (1 - omega)), got {self.omega}"),
            (len(self.interval) == 2 and all(math.isfinite(x) for x in self.interval),
             f"guidance interval must be two finite numbers, got {self.interval}"),
            (len(self.interval) != 2 or self.interval[0] <= self.interval[1],
             f"guidance interval must have low <= high, got {self.interval}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def scale(self) -> float:
        """The classifier-free guidance scale the model converges to: the target feeds the network's own u_cond back,
        so at r = t the fixed point is u_cond - u_uncond = s (E[v | c] - E[v]) with s = omega / (1 - kappa) for
        MeanFlow's form (its Sec. 4.2) and s = 1 / (1 - omega) for model guidance (DMF's omega 0.6: 2.5); 1 is none.
        A kappa of 1 or a model-guidance omega of 1 or more has no fixed point: the difference grows every step."""
        if self.form == "meanflow":
            return self.omega / (1.0 - self.kappa) if self.kappa < 1.0 else math.inf
        if self.form == "distill":
            return self.omega  # the teacher is frozen: no loop, the scale is the formula's
        return 1.0 / (1.0 - self.omega) if self.omega < 1.0 else math.inf

    @property
    def is_identity(self) -> bool:
        """v_g = v on every row: no extra forwards are needed (never so for a teacher's target)."""
        if self.form == "meanflow":
            return self.omega == 1.0 and self.kappa == 0.0
        return self.form == "model" and self.omega == 0.0


def guided_velocity(v: torch.Tensor, u_cond: torch.Tensor, u_uncond: torch.Tensor,
                    guidance: TrainedGuidance) -> torch.Tensor:
    """v_g on every row: MeanFlow Sec. 4.2 (omega, kappa) or DMF's model guidance v + omega (u_cond - u_uncond)."""
    if guidance.form == "meanflow":
        return guidance.omega * v + guidance.kappa * u_cond + (1 - guidance.omega - guidance.kappa) * u_uncond
    return v + guidance.omega * (u_cond - u_uncond)


def distilled_velocity(t_cond: torch.Tensor, t_uncond: torch.Tensor, t: torch.Tensor, drop: torch.Tensor,
                       guidance: TrainedGuidance) -> torch.Tensor:
    """The teacher's target (form "distill"): T_uncond + omega (T_cond - T_uncond) on rows whose t lies in the
    interval, T_cond on the others, T_uncond wherever the label was dropped (DMF's `compute_guidance`, `distill`)."""
    low, high = guidance.interval
    guided = _rows((t >= low) & (t <= high), t_cond)
    target = torch.where(guided, t_uncond + guidance.omega * (t_cond - t_uncond), t_cond)
    return torch.where(_rows(drop, t_cond), t_uncond, target)


def guidance_mask(t: torch.Tensor, drop: torch.Tensor, interval: tuple[float, float]) -> torch.Tensor:
    """Rows that get guidance: t in [low, high] and the label kept (MeanFlow's cfg_mask, DMF's cfg_ids)."""
    low, high = interval
    return (t >= low) & (t <= high) & ~drop


def mean_flow_target(v_g: torch.Tensor, dudt: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """u_tgt = v - (t - r) du/dt, the MeanFlow identity (Eq. 6 of MeanFlow); equals v where r = t."""
    return v_g - _rows(t - r, v_g) * dudt


def adaptive_weight(per_sample: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """w = 1 / sg((L + c)^p), the adaptive loss weight (MeanFlow Sec. 4.3; norm_p, norm_eps in the official code)."""
    return 1.0 / (per_sample.detach() + c) ** p


def adaptive_loss(per_sample: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """sg(w) L: about 1 per sample, with gradient dL / (L + c)^p (MeanFlow Sec. 4.3)."""
    return adaptive_weight(per_sample, p, c) * per_sample


@dataclass(frozen=True)
class MeanFlow:
    """The mean-flow process on the linear path `path`: its time draws, guided targets and adaptive loss.

    time_mean, time_std: the noise levels of t and r are logit-normal, sigmoid(N(time_mean, time_std)).
    r_time: (mean, std) of r's own logit-normal (DMF's separate proposals); None draws both as t's.
    interval_ratio: the fraction of rows with r != t; the others (r = t) train the instantaneous velocity.
    adaptive_p, adaptive_c: the loss weight 1 / sg(L + c)^p (p = 0: the plain squared error).
    guidance: the guidance trained into the target (`TrainedGuidance`; the default is none).
    """

    path: FlowMatching = field(default_factory=lambda: FlowMatching(direction="data-to-noise"))
    time_mean: float = -0.4
    time_std: float = 1.0
    r_time: tuple[float, float] | None = None
    interval_ratio: float = 0.25
    adaptive_p: float = 1.0
    adaptive_c: float = 0.01
    guidance: TrainedGuidance = field(default_factory=TrainedGuidance)

    def __post_init__(self):
        numbers = (self.time_mean, self.time_std, *(self.r_time or ()), self.interval_ratio, self.adaptive_p,
                   self.adaptive_c)
        checks = [
            (isinstance(self.guidance, TrainedGuidance),
             f"guidance must be a TrainedGuidance, got {type(self.guidance).__name__}"),
            (all(math.isfinite(x) for x in numbers), f"mean-flow settings must be finite numbers, got {numbers}"),
            (self.time_std > 0, f"time_std must be > 0, got {self.time_std}"),
            (self.r_time is None or (len(self.r_time) == 2 and self.r_time[1] > 0),
             f"r_time must be (mean, std) with std > 0, got {self.r_time}"),
            (0.0 <= self.interval_ratio <= 1.0, f"interval_ratio must be in [0, 1], got {self.interval_ratio}"),
            (self.adaptive_p >= 0, f"adaptive_p must be >= 0, got {self.adaptive_p}"),
            (self.adaptive_c > 0, f"adaptive_c must be > 0, got {self.adaptive_c}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    # The path's conventions, unchanged.
    @property
    def learn_sigma(self) -> bool:
        return self.path.learn_sigma

    @property
    def data_time(self) -> float:
        return self.path.data_time

    @property
    def noise_time(self) -> float:
        return self.path.noise_time

    def noise_level(self, t):
        return self.path.noise_level(t)

    def time_at(self, sigma):
        return self.path.time_at(sigma)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.path.q_sample(x_start, t, noise)

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.path.split_output(model_output)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return self.path.model_timesteps(t)

    def time_grid(self, steps: int, shift: float = 1.0) -> list[float]:
        return self.path.time_grid(steps, shift)

    def less_noisy(self, tr: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
        """From the pair (t, r) of each row, the path's time nearer the data than t (the teacher sees r = t)."""
        return self.path.less_noisy(tr[:, 0], amount)

    # Training.
    def draw_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(t, r) per row, shape (batch, 2), from `generator` only: a normal pair, then a uniform."""
        normal = torch.randn((batch, 2), generator=generator)
        uniform = torch.rand(batch, generator=generator)
        return self.times_from_draws(normal, uniform)

    def times_from_draws(self, normal: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """Two logit-normal noise levels per row, the larger one t's (MeanFlow Sec. 4.3); r := t where
        uniform < 1 - interval_ratio, as zhuyu-cs's `sample_time_steps` (the official code takes the first rows)."""
        if self.r_time is None:
            levels = torch.sigmoid(normal * self.time_std + self.time_mean)  # (N, 2)
        else:  # DMF: the second level from r's own proposal, before the sort
            r_mean, r_std = self.r_time
            levels = torch.sigmoid(torch.stack([normal[:, 0] * self.time_std + self.time_mean,
                                                normal[:, 1] * r_std + r_mean], dim=1))  # (N, 2)
        t = self.time_at(levels.amax(dim=1))  # (N,)
        r = self.time_at(levels.amin(dim=1))  # (N,)
        r = torch.where(uniform < 1 - self.interval_ratio, t, r)
        return torch.stack([t, r], dim=1)  # (N, 2)

    def guide(self, net: TrainingNet, z_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, labels: torch.Tensor,
              drop: torch.Tensor) -> torch.Tensor:
        """v_g: the guided velocity on the rows of `guidance_mask`, v elsewhere; no forwards when guidance is off."""
        if self.guidance.is_identity:
            return v
        n = z_t.shape[0]
        null = torch.cat([torch.zeros_like(drop), torch.ones_like(drop)])  # (2N,): second half gets the null label
        tt = torch.cat([t, t])  # (2N,)
        if self.guidance.form == "distill":
            out = net.teach(torch.cat([z_t, z_t]), tt, torch.cat([labels, labels]), null)  # (2N, C', H, W)
            t_cond, t_uncond = self.split_output(out)[0].float().split(n)  # 2 x (N, C, H, W)
            return distilled_velocity(t_cond, t_uncond, t, drop, self.guidance)
        out = net.evaluate(torch.cat([z_t, z_t]), tt, torch.cat([labels, labels]), null, r=tt)  # (2N, C', H, W)
        u_cond, u_uncond = self.split_output(out)[0].float().split(n)  # 2 x (N, C, H, W)
        mask = _rows(guidance_mask(t, drop, self.guidance.interval), v)
        return torch.where(mask, guided_velocity(v, u_cond, u_uncond, self.guidance), v)

    def time_derivative(self, net: TrainingNet, z_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                        v_g: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """du/dt along the flow: the JVP of u(z, t, r) with tangents (v_g, 1, 0) (MeanFlow Sec. 4.1)."""
        tangents = (v_g.to(z_t.dtype), torch.ones_like(t), torch.zeros_like(r))
        return self.split_output(net.jvp(z_t, t, r, labels, drop, tangents=tangents)[1])[0].float()

    def loss(self, net: TrainingNet, x_start: torch.Tensor, tr: torch.Tensor, noise: torch.Tensor,
             labels: torch.Tensor, drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample terms: "loss" = sg(w) L with L = ||u - sg(u_tgt)||^2 (MeanFlow Sec. 4.1), "mse" = L / CHW."""
        t, r = tr.unbind(dim=1)  # (N,) each
        z_t = self.q_sample(x_start, t, noise)
        v_g = self.guide(net, z_t, t, self.path.velocity(x_start, noise).float(), labels, drop)
        dudt = self.time_derivative(net, z_t, t, r, v_g, labels, drop)
        u_tgt = mean_flow_target(v_g, dudt, t, r).detach()
        u, _ = self.split_output(net(z_t, t, labels, drop, r=r))
        per_sample = ((u.float() - u_tgt) ** 2).flatten(1).sum(dim=1)  # (N,)
        return {"loss": adaptive_loss(per_sample, self.adaptive_p, self.adaptive_c),
                "mse": per_sample.detach() / u_tgt[0].numel()}


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))  # (N, 1, ..., 1)
