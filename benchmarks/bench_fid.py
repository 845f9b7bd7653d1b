"""Feature-extraction throughput of `dit fid` against torchmetrics' FID around the same network, with exactness.

The baseline is torchmetrics' `FrechetInceptionDistance(feature=...).update` driving our InceptionV3 as it was before
any inference preparation: convolution, BatchNorm and in-place ReLU per node in NCHW, the structure of torch-fidelity's
`FeatureExtractorInceptionV3` (torchvision's blocks), which torchmetrics uses and which we may not depend on. Ours is
`features.extract` (pool_3, spatial and IS statistics) with the module `load_inception` returns. Variants:

- `torchmetrics`: the baseline above;
- `ours-before`: `features.extract` with the baseline module (what `dit fid` did before the levers);
- `ours-fold`: BatchNorm folded into the convolutions, NCHW;
- `ours`: folded and channels-last, as `load_inception` returns it (what `dit fid` runs);
- `ours-compile` (opt in): `ours` under `torch.compile` with inductor freezing;
- `ours-bf16` (opt in): `ours` under bf16 autocast.

Every variant scores the same uint8 images (random smooth blobs, two halves from different ranges, as reference and
samples), timed in alternation, one full pass per repeat; the ratio is the median rate over torchmetrics' median rate,
and the paired ratio the median over repeats of torchmetrics' time over the variant's time in the same repeat (less
sensitive to load that drifts between repeats). The weights are random, with BatchNorm
statistics calibrated on the images so activations stay in range (speed does not depend on the values). Exactness is
checked in the same run: each variant's features on the first batch against the baseline module in float64 (max abs
difference over the max abs value), and the FID between the halves against torchmetrics' (relative difference).
The CPU model and the fp32 and bf16 matmul peaks (bench_model.py's measurement) are recorded with the figures.

    python benchmarks/bench_fid.py --device cpu --num-images 64 --batch-size 32 --repeats 5
    python benchmarks/bench_fid.py --device cuda --num-images 2048 --batch-size 128
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_model import measure_peaks
from torch import nn

from ditcli.evaluation import features, scores
from ditcli.evaluation.inception import InceptionV3, load_inception
from ditcli.runtime import resolve_device

RESULTS = Path(__file__).resolve().parent / "results" / "fid.json"
VARIANTS = ("torchmetrics", "ours-before", "ours-fold", "ours", "ours-compile", "ours-bf16")
DEFAULT_VARIANTS = ("torchmetrics", "ours-before", "ours-fold", "ours")
CALIBRATION_SIZE = 75  # the smallest input the graph takes: calibrating the BatchNorm statistics stays cheap


class PoolOnly(nn.Module):
    """The (N, 2048) pool_3 view of a module that torchmetrics' FID expects."""

    def __init__(self, net: InceptionV3):
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).pool


def smooth_images(n: int, low: int, high: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3) random blobs in [low, high)."""
    coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)  # (n, 3, size, size)
    return (low + smooth * (high - low)).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def random_state(images: np.ndarray, seed: int = 0) -> dict[str, torch.Tensor]:
    """He-initialised weights whose BatchNorm statistics come from one train-mode forward over `images`, with
    BatchNorm scales moved off 1 so that folding them is exercised."""
    generator = torch.Generator().manual_seed(seed)
    model = InceptionV3()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv.weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * math.sqrt(2 / p.shape[1:].numel()))
            elif name.endswith("bn.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # the running statistics become the calibration batch's
        model.input_size = CALIBRATION_SIZE
        model.train()(torch.from_numpy(images).permute(0, 3, 1, 2))  # (N, 3, H, W)
    return model.state_dict()


def batches(images: np.ndarray, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]  # (B, H, W, 3) uint8


def ours(extractor, halves, batch_size, device):
    """`dit fid`'s extraction: the reference half, then the sample half."""
    return [features.extract(batches(half, batch_size), extractor, device) for half in halves]


@torch.inference_mode()
def theirs(net, halves, batch_size, device):
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=PoolOnly(net)).to(device)
    for half, real in zip(halves, (True, False)):
        for batch in batches(half, batch_size):
            fid.update(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2), real=real)  # (B, 3, H, W)
    return fid


def build_variants(names, state, device, halves, batch_size):
    """name -> (run, extractor) where run() does one full pass and returns what FID needs."""
    baseline = InceptionV3().load_weights(state).to(device)
    folded = copy.deepcopy(baseline).fold_batchnorm()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / "inception.pth")
        fast = load_inception(Path(tmp) / "inception.pth", device)  # what `dit fid` runs
    extractors = {"torchmetrics": baseline, "ours-before": baseline, "ours-fold": folded, "ours": fast}
    if "ours-compile" in names:
        extractors["ours-compile"] = torch.compile(fast, options={"freezing": True})
    if "ours-bf16" in names:
        def bf16(images):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fast(images)
        extractors["ours-bf16"] = bf16
    runs = {}
    for name in names:
        if name == "torchmetrics":
            runs[name] = lambda: theirs(baseline, halves, batch_size, device)
        else:
            runs[name] = (lambda e: lambda: ours(e, halves, batch_size, device))(extractors[name])
    return runs, extractors


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(runs: dict, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """Seconds per full pass of each variant, in alternation so drifting load hits all alike; the last outputs."""
    seconds, outputs = {name: [] for name in runs}, {}
    for _ in range(repeats):
        for name, run in runs.items():
            sync(device)
            start = time.perf_counter()
            outputs[name] = run()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds, outputs


@torch.inference_mode()
def feature_errors(extractors: dict, state, images: np.ndarray, device) -> dict:
    """Max abs difference of each output over its max abs value, against the baseline module in float64."""
    exact = InceptionV3().load_weights(state).double().to(device)
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)  # (B, 3, H, W)
    truth = exact(x)
    errors = {}
    for name, extractor in extractors.items():
        out = extractor(x)
        errors[name] = {k: float((getattr(out, k).double() - getattr(truth, k)).abs().max() /
                                 getattr(truth, k).abs().max()) for k in ("pool", "spatial", "logits")}
    return errors


def fid_of(output) -> float:
    if isinstance(output, list):  # ours: reference then samples
        return scores.frechet_distance(*output[1].pool.stats(), *output[0].pool.stats())
    return float(output.compute())


def cpu_description() -> dict:
    info = {"machine": platform.machine(), "model_name": platform.processor() or platform.machine()}
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("flags", "").split())
        info.update(model_name=fields.get("model name", info["model_name"]), family=fields.get("cpu family"),
                    model=fields.get("model"), avx512_bf16="avx512_bf16" in flags, amx="amx_tile" in flags,
                    avx512f="avx512f" in flags)
    except OSError:
        pass
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-images", type=int, default=64, help="split in two halves: reference and samples")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":  # as `dit fid`
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    half = args.num_images // 2
    halves = (smooth_images(half, 0, 160, args.resolution, seed=1), smooth_images(half, 90, 256, args.resolution, 2))
    state = random_state(smooth_images(8, 0, 256, args.resolution, seed=3))
    peaks = measure_peaks(device)
    runs, extractors = build_variants(args.variants, state, device, halves, args.batch_size)

    # A warm-up pass each (compiles, allocator, oneDNN primitives), then the timed repeats in alternation.
    warmup = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        warmup[name] = time.perf_counter() - start
    seconds, outputs = timed(runs, device, args.repeats)
    errors = feature_errors({k: v for k, v in extractors.items() if k in runs}, state,
                            halves[0][:args.batch_size], device)
    final = measure_peaks(device)
    peaks = {k: max(v, final[k]) for k, v in peaks.items()}

    fids = {name: fid_of(out) for name, out in outputs.items()}
    rate = {name: 2 * half / statistics.median(s) for name, s in seconds.items()}
    base_rate, base_fid = rate.get("torchmetrics"), fids.get("torchmetrics")
    paired = {name: statistics.median(b / s for b, s in zip(seconds["torchmetrics"], seconds[name]))
              for name in runs} if base_rate else {}
    rows = [{"variant": name, "img_per_s": rate[name], "seconds": seconds[name], "warmup_s": warmup[name],
             "ratio_vs_torchmetrics": rate[name] / base_rate if base_rate else None,
             "paired_ratio_vs_torchmetrics": paired.get(name),
             "fid": fids[name], "fid_rel_diff_vs_torchmetrics": abs(fids[name] - base_fid) / abs(base_fid)
             if base_fid else None, "feature_error_vs_float64": errors[name]} for name in runs]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_description(),
        "matmul_peak_gflops": peaks,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_images": 2 * half, "batch_size": args.batch_size, "resolution": args.resolution, "repeats": args.repeats,
        "rows": rows,
    }
    for row in rows:
        print(f"{row['variant']:>13}: {row['img_per_s']:6.2f} img/s, x{row['ratio_vs_torchmetrics'] or 0:.2f} "
              f"(paired x{row['paired_ratio_vs_torchmetrics'] or 0:.2f}), "
              f"FID rel diff {row['fid_rel_diff_vs_torchmetrics'] or 0:.1e}, feature error "
              f"{max(row['feature_error_vs_float64'].values()):.1e}, runs "
              f"{', '.join(f'{2 * half / s:.2f}' for s in row['seconds'])}")
    print(f"{result['cpu']['model_name']}, {result['threads']} threads, matmul peak fp32 {peaks['fp32']:.0f} "
          f"GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; {2 * half} images at {args.resolution} px, batch "
          f"{args.batch_size}, median of {args.repeats}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
