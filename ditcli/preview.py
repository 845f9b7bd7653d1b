"""Small sample grids for watching a run: a fixed set of labels and seeds, DDIM, the EMA weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditcli.codec import to_uint8
from ditcli.images import image_grid
from ditcli.samplers import Guidance, ImageNoise, guided_model_fn, plan_sampler, unconditional_model_fn


@torch.no_grad()
def ema_preview(model, codec, schedule: str, path: Path, seed: int, class_names: list[str] | None,
                per_class: int = 2, steps: int = 25, cfg: float = 2.0) -> Path:
    """Write a grid with `per_class` images of up to 10 classes (or 16 unconditional ones) to `path`."""
    config = model.config
    device = next(model.parameters()).device
    plan = plan_sampler("ddim", steps, config.learn_sigma, schedule=schedule)  # the betas the model was trained on
    if config.num_classes:
        classes = np.linspace(0, config.num_classes - 1, min(10, config.num_classes)).round().astype(int)
        labels = torch.tensor(np.repeat(classes, per_class), device=device)
        model_fn = guided_model_fn(model, labels, plan.diffusion, Guidance(cfg, "all"), config.num_classes)
    else:
        labels = torch.zeros(16, dtype=torch.long, device=device)
        model_fn = unconditional_model_fn(model, plan.diffusion)
    noise = ImageNoise(seed, range(len(labels)))
    shape = (len(labels), config.in_channels, config.input_size, config.input_size)
    x = noise(torch.empty(shape, device=device))
    latents = plan.sample(model_fn, x, plan.diffusion, noise)
    images = to_uint8(codec.decode(latents)).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, per_class * 2 if config.num_classes else 4).save(path)
    return path
