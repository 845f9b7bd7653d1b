"""What representation alignment adds to a training step, on this machine.

    python benchmarks/bench_align.py [--batch 64] [--rounds 5] [--precision fp32 bf16] [--dinov2-weights PATH]

`Trainer.train_step` of the embedded model's shape (DiT-S/4 at width 192, depth 6, on 28x28 grayscale, 10 classes;
the flow objective of the shipped model) on synthetic images: the plain step, then each alignment with its defaults:
REPA with the Fashion-MNIST judge as encoder (REPA's 2048-wide projector, and a 256-wide one), SRA (`--align self`,
which adds a forward of the EMA's first blocks), the dispersive loss, and REPA with DINOv2 when --dinov2-weights is
given (the released ViT-L/14, 300M parameters, fed 98 px images for the 7 x 7 token grid). The variants are timed in
alternation, round by round, and the median kept; the ratio is each median over the plain step's. The CPU model and
the matmul peaks are recorded in the same run, since figures are comparable only within one run. Writes
benchmarks/results/align-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from bench_meanflow import step_seconds, trainers
from bench_precision import cpu_model, matmul_peak

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = {"model": "DiT-S/4", "image_size": 28, "channels": 1, "vae": None, "hidden_size": 192, "depth": 6,
         "num_heads": 3, "learn_sigma": False, "flip": False, "objective": "flow", "time_sampling": "logit-normal"}
REPA_JUDGE = {"align": "repa", "align_encoder": "fashion-judge"}
VARIANTS = {
    "plain": {},
    "repa judge": REPA_JUDGE,
    "repa judge, projector 256": {**REPA_JUDGE, "align_projector_dim": 256},
    "self (SRA)": {"align": "self"},
    "dispersive": {"dispersive": True},
    "repa judge + dispersive": {**REPA_JUDGE, "dispersive": True},
}


def time_training(batch: int, precision: str, rounds: int, variants: dict) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        runs = trainers(batch, precision, Path(folder), variants, SHAPE)
        seconds = step_seconds(runs, rounds)
        heads = {name: sum(p.numel() for p in run.alignment.heads.parameters())
                 if run.alignment is not None and run.alignment.heads is not None else 0 for name, run in runs.items()}
    plain = statistics.median(seconds["plain"])
    return {name: {"step_s": round(statistics.median(s), 3), "img_per_s": round(batch / statistics.median(s), 1),
                   "vs_plain": round(statistics.median(s) / plain, 2), "head_parameters": heads[name]}
            for name, s in seconds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", nargs="+", default=["fp32"])
    parser.add_argument("--dinov2-weights", default=None, help="add REPA with this DINOv2 file as the encoder")
    parser.add_argument("--out", type=Path, default=RESULTS / "align-cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    variants = dict(VARIANTS)
    if args.dinov2_weights:
        variants["repa dinov2"] = {"align": "repa", "align_encoder": "dinov2", "dinov2_weights": args.dinov2_weights}
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "batch": args.batch, "rounds": args.rounds,
              "shape": SHAPE, "peaks_gflops": {"fp32": round(matmul_peak(torch.float32)),
                                               "bf16": round(matmul_peak(torch.bfloat16))}}
    for precision in args.precision:
        result[f"training_{precision}"] = time_training(args.batch, precision, args.rounds, variants)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
