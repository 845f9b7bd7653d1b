"""The quality gate of an embedded Fashion-MNIST DiT, judged by an independent classifier.

    python benchmarks/fashion_gate.py                     # all of it: accuracy, FD table, floor (fashion-mnist)
    python benchmarks/fashion_gate.py --only accuracy
    python benchmarks/fashion_gate.py --ckpt weights/fashion-mnist-ddpm.safetensors --only accuracy

1. Class-conditional accuracy: 100 samples per class with the file's own default sampler, steps, cfg and guidance
   interval (what `dit sample` does); the judge (benchmarks/fashion_judge.py, trained on the train split only) must
   label >= 85% as the requested class.
2. Fréchet distance in the judge's 128-d penultimate features against the test split, through
   `dit fid --features fashion-judge`, for the reference protocol and two fewer-step samplers of the model's
   objective (DDPM: DDPM-250, DDIM-50, DPM-Solver++ 20; flow: SiT's SDE-250, Euler 50, Heun 10) at the default cfg,
   and for cfg 1, 2 and 4 with the default sampler; the test-versus-train FD is the floor.
Results go to benchmarks/results/fashion_gate[_accuracy|_fd]-<weights>.json and a sample sheet (one row per class) to
docs/images/<weights>-samples.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ditcli.data.images import image_grid
from ditcli.data.sources import load_fashion_mnist
from ditcli.diffusion.guidance import Guidance
from ditcli.evaluation.judge import JUDGE_NAME, load_judge
from ditcli.model.codec import PixelCodec
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.generate import class_labels, generate_images
from ditcli.weights.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The reference protocol first (the one --no-ddpm leaves out: 250 steps), then two samplers with fewer steps.
FD_ROWS = {"ddpm": [("ddpm", 250), ("ddim", 50), ("dpm++2m", 20)], "flow": [("sde", 250), ("euler", 50), ("heun", 10)]}


def sample(model, config: GenerateConfig) -> tuple[np.ndarray, float, int]:
    """All images of `config` as uint8 (N, 28, 28, 1), the seconds it took, and the NFE per image."""
    started = time.perf_counter()
    batches = list(generate_images(model, PixelCodec(1), config, range(config.num_images), torch.device("cpu")))
    images = np.concatenate([b.images.numpy() for b in batches])
    return images, time.perf_counter() - started, batches[0].nfe


@torch.no_grad()
def judge_accuracy(images: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    judge = load_judge()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 1, 28, 28)
    predicted = torch.cat([judge(chunk).argmax(1) for chunk in x.split(500)]).numpy()
    per_class = [float((predicted[labels == c] == c).mean()) for c in range(10)]
    return float((predicted == labels).mean()), per_class


def write_npz(path: Path, images: np.ndarray) -> Path:
    """ADM's layout: arr_0 uint8 (N, H, W, 3); grayscale is repeated over the three channels."""
    np.savez(path, arr_0=np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images)
    return path


def frechet(samples: Path, ref: Path) -> float:
    """FD through the CLI, exactly as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "ditcli", "fid", str(samples), "--ref", str(ref), "--features",
                          JUDGE_NAME, "--device", "cpu", "--batch-size", "500", "--json"],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)["fid"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(ROOT / "weights" / "fashion-mnist.safetensors"))
    parser.add_argument("--num-per-class", type=int, default=100)
    parser.add_argument("--fd-per-class", type=int, default=100, help="Samples per class for each FD row.")
    parser.add_argument("--only", choices=["accuracy", "fd"], default=None)
    parser.add_argument("--no-ddpm", action="store_true", help="Leave out the 250-step reference row (10x the NFE).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(RESULTS / "fashion_gate_work"))
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.ckpt)
    model = checkpoint.build("cpu")
    defaults, stem = checkpoint.sampling, Path(args.ckpt).stem
    if defaults is None:
        raise SystemExit(f"{args.ckpt} records no sampling defaults: write them with dit convert --sampler ...")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": args.ckpt, "objective": checkpoint.objective.to_metadata(),
              "defaults": {"sampler": defaults.sampler, "steps": defaults.steps, "cfg": defaults.cfg,
                           "interval": defaults.interval}, "threads": torch.get_num_threads()}

    def config(per_class, sampler=defaults.sampler, steps=defaults.steps, cfg=defaults.cfg, interval=None):
        return GenerateConfig(labels=tuple(class_labels(range(10), per_class)), seed=args.seed, sampler=sampler,
                              steps=steps, guidance=Guidance(cfg, "all", interval), batch_size=200,
                              schedule=checkpoint.schedule, objective=checkpoint.objective)

    if args.only in (None, "accuracy"):
        run = config(args.num_per_class, interval=defaults.interval)  # exactly what `dit sample` does by default
        images, seconds, nfe = sample(model, run)
        accuracy, per_class = judge_accuracy(images, np.array(run.labels))
        result["accuracy"] = {"value": accuracy, "per_class": dict(zip(checkpoint.class_names, per_class)),
                              "images": len(images), "seconds": seconds, "nfe": nfe, "passes": accuracy >= 0.85}
        print(json.dumps(result["accuracy"]), flush=True)
        sheet = np.concatenate([images[c * args.num_per_class:][:10] for c in range(10)])
        (ROOT / "docs" / "images").mkdir(exist_ok=True)
        image_grid(sheet, 10).resize((560, 560), 0).save(ROOT / "docs" / "images" / f"{stem}-samples.png")

    if args.only in (None, "fd"):
        test = write_npz(work / "test.npz", load_fashion_mnist(split="test").images)
        train = write_npz(work / "train.npz", load_fashion_mnist(split="train").images)
        reference, *fewer = FD_ROWS[checkpoint.objective.name]
        rows = [(sampler, steps, defaults.cfg) for sampler, steps in ([] if args.no_ddpm else [reference]) + fewer]
        rows += [(defaults.sampler, defaults.steps, cfg) for cfg in (1.0, 2.0, 4.0)]
        result["fd"] = [{"setting": "floor: test split vs train split", "fd": frechet(test, train)}]
        print(json.dumps(result["fd"][-1]), flush=True)
        for sampler, steps, cfg in dict.fromkeys(rows):
            images, seconds, nfe = sample(model, config(args.fd_per_class, sampler, steps, cfg))
            fd = frechet(write_npz(work / f"{sampler}-{steps}-cfg{cfg:g}.npz", images), test)
            result["fd"].append({"sampler": sampler, "steps": steps, "cfg": cfg, "nfe": nfe, "images": len(images),
                                 "fd": fd, "seconds": seconds})
            print(json.dumps(result["fd"][-1]), flush=True)

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"fashion_gate{'' if args.only is None else '_' + args.only}-{stem}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
