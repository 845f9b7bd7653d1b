"""The adapters that turn a DiT into the `model_fn` a sampler calls: classifier-free guidance (with DiT's
guided channels and an interval), the unconditional model, per-image noise from (seed, index), and NFE counting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ditcli.diffusion.process import Process
from ditcli.errors import UserValueError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
PAPER_CHANNELS = "paper"  # the first 3 latent channels, as DiT's reference sampler guides them (see `Guidance`)
GUIDED_CHANNELS = (PAPER_CHANNELS, "all")
DEFAULT_CHANNELS = PAPER_CHANNELS  # for a file that records no guided channels
MAX_SEED = 2**63 - 1  # the largest seed of a run: every generator of a run is seeded by `image_seed(seed, i)`
MAX_CFG = 100.0  # the largest guidance scale, of `--cfg` and of a file's record: larger ones only overflow the eps


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` in a run with `seed`: a fixed mix, so no image depends on batching."""
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    return mixed >> 1


class ImageNoise:
    """Per-image Gaussian noise: image i of a run draws only from its own generator, seeded by (seed, i).

    Noise is drawn on the CPU in float32 and moved to the target device, so an image is the same whatever the batch
    size, the order, the number of processes or the device.
    """

    def __init__(self, seed: int, indices: list[int] | range):
        self.generators = [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        draws = [torch.randn(like.shape[1:], generator=g) for g in self.generators]
        return torch.stack(draws).to(device=like.device, dtype=like.dtype)  # (N, ...)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings (Ho & Salimans, 2022).

    scale: 1 runs the conditional model alone, 0 the unconditional one, s > 1 extrapolates.
    channels: "paper" guides only the first 3 latent channels, as the DiT reference sampler does; it is kept because
        the published FIDs were measured that way (models with fewer than 3 channels guide them all). "all" guides
        every eps channel.
    interval: (low, high) in training timesteps; guidance applies only where low <= t <= high (Kynkaanniemi et al.,
        2024). None guides every step.
    """

    scale: float = 1.0
    channels: str = DEFAULT_CHANNELS
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        if not math.isfinite(self.scale) or self.scale < 0:
            raise UserValueError(f"cfg scale must be >= 0, got {self.scale}", "1 disables guidance, 0 is unconditional")
        if self.channels not in GUIDED_CHANNELS:
            raise UserValueError(f"unknown guided channels {self.channels!r}",
                                 f"choose from {', '.join(GUIDED_CHANNELS)}")
        if self.interval is not None and not (0 <= self.interval[0] <= self.interval[1]):
            raise UserValueError(f"guidance interval must be 0 <= low <= high, got {self.interval}")

    def active(self, t: float) -> bool:
        return self.interval is None or self.interval[0] <= t <= self.interval[1]


def call_model(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               r: torch.Tensor | None) -> torch.Tensor:
    """model(x, t, y), with a mean-flow model's second time `r` only where one is given (no other model takes it)."""
    return model(x, t, y) if r is None else model(x, t, y, r=r)


def guided_model_fn(model: torch.nn.Module, labels: torch.Tensor, diffusion: Process,
                    guidance: Guidance, null_class: int) -> ModelFn:
    """The `model_fn` of a class-conditional DiT under classifier-free guidance.

    At scale 1 (or outside the guidance interval) only the conditional pass runs; at scale 0 only the unconditional
    one. Otherwise one forward of the doubled batch [cond, uncond] counts as one NFE. The interval is decided at the
    evaluation's time, or at `step_index` where a multi-stage sampler passes its step's start. A mean-flow model's
    second time `r` (`ditcli.diffusion.flow_map`) goes to every pass; the interval is still decided at t.
    """
    in_channels = model.config.in_channels
    guided = min(3, in_channels) if guidance.channels == PAPER_CHANNELS else in_channels  # never the variance channels
    null = torch.full_like(labels, null_class)

    def model_fn(x: torch.Tensor, index: torch.Tensor, step_index: torch.Tensor | None = None,
                 r: torch.Tensor | None = None) -> torch.Tensor:
        t = diffusion.model_timesteps(index)
        decides = t if step_index is None else diffusion.model_timesteps(step_index)  # a step's later stages
        scale = guidance.scale if guidance.active(float(decides[0])) else 1.0
        r = None if r is None else diffusion.model_timesteps(r)
        if scale == 1.0:
            return call_model(model, x, t, labels, r)
        if scale == 0.0:
            return call_model(model, x, t, null, r)
        out = call_model(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]),
                         None if r is None else torch.cat([r, r]))  # (2N, C_out, H, W)
        cond, uncond = out.chunk(2)
        eps = torch.lerp(uncond[:, :guided], cond[:, :guided], scale)  # uncond + s * (cond - uncond)
        return torch.cat([eps, cond[:, guided:]], dim=1)  # (N, C_out, H, W)

    return model_fn


def unconditional_model_fn(model: torch.nn.Module, diffusion: Process) -> ModelFn:
    """The `model_fn` of a model trained without labels: every image gets the null class."""
    def model_fn(x: torch.Tensor, index: torch.Tensor, step_index: torch.Tensor | None = None,
                 r: torch.Tensor | None = None) -> torch.Tensor:
        labels = torch.full((x.shape[0],), model.config.num_classes, dtype=torch.long, device=x.device)
        return call_model(model, x, diffusion.model_timesteps(index), labels,
                          None if r is None else diffusion.model_timesteps(r))

    return model_fn


class CountingModelFn:
    """Wraps a model_fn and counts its calls: the NFE of a run (a doubled CFG batch counts once)."""

    def __init__(self, model_fn: ModelFn):
        self.model_fn = model_fn
        self.calls = 0

    def __call__(self, x: torch.Tensor, index: torch.Tensor, *step_index: torch.Tensor,
                 **times: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model_fn(x, index, *step_index, **times)
