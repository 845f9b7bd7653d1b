"""Why the dispersive loss at temperature 1 slows the alignment study's runs (docs/alignment.md): the scale of the
tokens it reads, and the loss itself, on the same batch for each checkpoint.

    python benchmarks/dispersive_scale.py ~/dit-runs/align-study-4006/{baseline,dispersive}/ckpt-0004006.pt

For each training checkpoint (its raw weights, not the EMA, as training sees them), one fixed batch: 128 Fashion-MNIST
train images (seed 0) noised on the flow path at logit-normal times, through the model up to its last block (the
block `--dispersive` reads by default). Prints the tokens' RMS, the mean and smallest squared distance between two
images' flattened tokens divided by their length (what the loss divides by tau), and the loss at tau = 1 beside its
floor, -log N: the value when every pair is so far apart that only the diagonal counts, where its gradient vanishes.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from ditcli.data.sources import load_fashion_mnist
from ditcli.diffusion.flow import FlowMatching
from ditcli.training.align import dispersive_loss
from ditcli.weights.checkpoint import load_checkpoint

BATCH = 128  # the study's batch


def noised_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t, t and the labels of BATCH train images, on the study's flow path (noise at t = 0, data at t = 1)."""
    data = load_fashion_mnist(split="train")
    index = np.random.default_rng(seed).choice(len(data.images), BATCH, replace=False)
    x1 = torch.from_numpy(data.images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1
    flow = FlowMatching(time_sampling="logit-normal")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x1.shape, generator=generator)
    t = flow.draw_times(BATCH, generator)
    return flow.q_sample(x1, t, noise), t, torch.from_numpy(data.labels[index])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="training checkpoints (ckpt-*.pt) of flow runs")
    args = parser.parse_args()
    x, t, y = noised_batch()
    print(f"{BATCH} images; the loss's floor is -log {BATCH} = {-math.log(BATCH):.5f}")
    for path in args.checkpoints:
        model = load_checkpoint(path, weights="model").build()
        with torch.no_grad():
            _, (tokens,) = model.forward_tokens(x, t, y, None, None, (len(model.blocks),), head=False)
        flat = tokens.flatten(1)
        distances = torch.pdist(flat).pow(2) / flat.shape[1]
        print(f"{path}: token RMS {tokens.pow(2).mean().sqrt():.2f}, squared distance / length mean "
              f"{distances.mean():.2f} (smallest {distances.min():.2f}), loss {dispersive_loss(tokens, 1.0):.5f}")


if __name__ == "__main__":
    main()
