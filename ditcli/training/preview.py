"""Small sample grids for watching a run: a fixed set of labels and seeds, a quick sampler, the EMA weights.

The grid is `dit sample`'s grid.png: small images upscaled to at least PREVIEW_CELL px (nearest neighbour), each with
its class name below it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditcli.data.images import make_grid
from ditcli.diffusion.guidance import (
    Guidance,
    ImageNoise,
    guided_model_fn,
    unconditional_model_fn,
)
from ditcli.model.codec import to_uint8

PER_CLASS = 2  # images of each shown class
SHOWN_CLASSES = 10  # at most this many classes, spread over the label range
UNCONDITIONAL_IMAGES = 16  # a 4 x 4 grid for a model without labels
STEPS, CFG = 25, 2.0  # steps and guidance: quick, and enough to see a run improve
PREVIEW_CELL = 96  # the smallest shown image side in px: a 28 px Fashion-MNIST image is drawn 4x


@torch.no_grad()
def ema_preview(model, codec, objective, schedule: str, path: Path, seed: int,
                class_names: list[str] | None = None) -> Path:
    """Write a grid of PER_CLASS images of up to SHOWN_CLASSES classes (or UNCONDITIONAL_IMAGES) to `path`, two
    classes a row, each image captioned with its class's name (from `class_names`, else its id).

    `objective` is the training objective (its quick preview sampler on `schedule`'s betas, or the flow), so the
    preview samples what was trained.
    """
    config = model.config
    device = next(model.parameters()).device
    plan = objective.plan(objective.preview_sampler, STEPS, config.learn_sigma, schedule=schedule)
    if config.num_classes:
        classes = np.linspace(0, config.num_classes - 1, min(SHOWN_CLASSES, config.num_classes)).round().astype(int)
        labels = torch.tensor(np.repeat(classes, PER_CLASS), device=device)
        model_fn = guided_model_fn(model, labels, plan.process, Guidance(CFG, "all"), config.num_classes)
    else:
        labels = torch.zeros(UNCONDITIONAL_IMAGES, dtype=torch.long, device=device)
        model_fn = unconditional_model_fn(model, plan.process)
    noise = ImageNoise(seed, range(len(labels)))
    shape = (len(labels), config.in_channels, config.input_size, config.input_size)
    x = noise(torch.empty(shape, device=device))
    latents = plan.sample(model_fn, x, plan.process, noise)
    images = to_uint8(codec.decode(latents)).cpu().numpy()  # (N, H, W, C)
    names = class_names or [str(i) for i in range(config.num_classes)]
    captions = [names[label] if config.num_classes else "" for label in labels.tolist()]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(list(images), captions, PER_CLASS * 2 if config.num_classes else 4, min_cell=PREVIEW_CELL).save(path)
    return path
