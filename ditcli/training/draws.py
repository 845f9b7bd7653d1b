"""The randomness contract of training: every random draw of a global batch (image order, times, noise, label
dropout, SRA's teacher time) comes from (seed, step) alone, so a run is the same on one process or eight, resumed or
not.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ditcli.data.sources import ImageSet
from ditcli.diffusion.guidance import image_seed
from ditcli.model.codec import from_uint8
from ditcli.training.config import TrainConfig
from ditcli.training.latent_cache import LatentCache


class TrainingData:
    """Samples x_0 for a global batch: pixels, or posterior draws from the latent cache, scaled by the codec."""

    def __init__(self, images: ImageSet, cache: LatentCache | None, flip: bool):
        self.images, self.cache, self.flip = images, cache, flip

    def __len__(self):
        return len(self.images)

    def x_start(self, indices: np.ndarray, flips: np.ndarray, posterior_noise: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            mean, std = self.cache.gather(indices, flips)
            return (mean + std * posterior_noise) * self.cache.scale  # (n, c, h, w)
        return from_uint8(self.flipped(indices, flips))  # (n, C, H, W)

    def pixels(self, indices: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """The clean images as uint8 (n, C, H, W), flipped as `x_start` (what an alignment encoder sees)."""
        return self.flipped(indices, flips).permute(0, 3, 1, 2)

    def flipped(self, indices: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """The uint8 images (n, H, W, C) at `indices`, mirrored left-right where `flips` says."""
        x = torch.from_numpy(np.ascontiguousarray(self.images.images[indices]))
        mirrored = torch.from_numpy(flips.astype(bool))
        return torch.where(mirrored[:, None, None, None], x.flip(2), x)


@dataclass
class StepDraws:
    """The random draws of one global batch."""

    indices: np.ndarray
    flips: np.ndarray
    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor
    posterior_noise: torch.Tensor
    shift: torch.Tensor  # uniform in [0, 1): how much less noisy SRA's teacher sees the image (`--align self`)

    def slice(self, lo: int, hi: int) -> StepDraws:
        return StepDraws(self.indices[lo:hi], self.flips[lo:hi], self.t[lo:hi], self.noise[lo:hi],
                         self.drop[lo:hi], self.posterior_noise[lo:hi], self.shift[lo:hi])


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, num_images: int) -> torch.Tensor:
    """The data order of one epoch, drawn once per epoch rather than once per step."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(image_seed(seed, -1 - epoch)))


def draw_step(config: TrainConfig, step: int, num_images: int, shape: tuple, objective, dropout: float) -> StepDraws:
    """Everything random about global batch `step`; epochs are permutations seeded by (seed, epoch).

    `objective` draws the times (DDPM's integer timesteps, flow's [0, 1] times) at the same place in the stream.
    """
    batch = config.global_batch
    per_epoch = max(1, num_images // batch)
    epoch, offset = divmod(step, per_epoch)
    order = epoch_order(config.seed, epoch, num_images)
    indices = order[offset * batch: offset * batch + batch].numpy()
    if len(indices) < batch:  # fewer images than one batch: wrap around
        indices = np.resize(order.numpy(), batch)
    g = torch.Generator().manual_seed(image_seed(config.seed, step))
    flips = (torch.rand(batch, generator=g) < 0.5).numpy() & config.flip
    t = objective.draw_times(batch, g)
    noise = torch.randn((batch, *shape), generator=g)
    drop = torch.rand(batch, generator=g) < dropout
    posterior_noise = torch.randn((batch, *shape), generator=g)
    shift = torch.rand(batch, generator=g)  # last, so that the draws before it are those of runs from before it
    return StepDraws(indices, flips.astype(np.int64), t, noise, drop, posterior_noise, shift)
