"""Feature-extraction throughput of `dit fid` against torchmetrics' FID driven by the same Inception module.

Both sides run our InceptionV3 (random weights: speed does not depend on their values) over the same uint8 images.
Ours is `metrics.extract`, which keeps pool_3, spatial and IS statistics; torchmetrics is
`FrechetInceptionDistance(feature=...).update`, which keeps pool_3 sums. Each repeat times one pass over all images,
ours then theirs; the medians over repeats and their ratio are printed and written to benchmarks/results/fid.json.

    python benchmarks/bench_fid.py --device cpu --num-images 16 --batch-size 8 --repeats 3
    python benchmarks/bench_fid.py --device cuda --num-images 2048 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditcli import metrics
from ditcli.inception import InceptionV3
from ditcli.runtime import resolve_device

RESULTS = Path(__file__).resolve().parent / "results" / "fid.json"


class PoolOnly(nn.Module):
    """The (N, 2048) pool_3 view of our module that torchmetrics' FID expects."""

    def __init__(self, net: InceptionV3):
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).pool


def batches(images: np.ndarray, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]  # (B, H, W, 3) uint8


def run_ours(net, images, batch_size, device):
    metrics.extract(batches(images, batch_size), net, device)


@torch.inference_mode()
def run_torchmetrics(net, images, batch_size, device):
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=PoolOnly(net)).to(device)
    for batch in batches(images, batch_size):
        fid.update(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2), real=False)  # (B, 3, H, W)


def images_per_second(fn, images, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    net = InceptionV3().eval().requires_grad_(False).to(device)
    images = np.random.default_rng(0).integers(0, 256, (args.num_images, args.resolution, args.resolution, 3),
                                               dtype=np.uint8)

    # One warm-up batch each, then repeats that alternate, so drifting load on a shared machine hits both alike.
    run_ours(net, images[:args.batch_size], args.batch_size, device)
    run_torchmetrics(net, images[:args.batch_size], args.batch_size, device)
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(images_per_second(lambda x: run_ours(net, x, args.batch_size, device), images, device))
        theirs.append(images_per_second(lambda x: run_torchmetrics(net, x, args.batch_size, device), images, device))

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "repeats": args.repeats,
        "ours_img_per_s": statistics.median(ours),
        "torchmetrics_img_per_s": statistics.median(theirs),
        "ratio_ours_over_torchmetrics": statistics.median(ours) / statistics.median(theirs),
        "ours_runs": ours,
        "torchmetrics_runs": theirs,
    }
    print(f"ours {result['ours_img_per_s']:.2f} img/s, torchmetrics {result['torchmetrics_img_per_s']:.2f} img/s, "
          f"ratio {result['ratio_ours_over_torchmetrics']:.3f} ({result['device']}, {args.num_images} images, "
          f"batch {args.batch_size}, median of {args.repeats})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
