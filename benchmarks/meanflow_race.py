"""The race of issue 30: the whole `dit sample` command, start-up included, of the embedded mean-flow model at 1 and 2
steps against the flow model's default (`--model fashion-mnist-flow`, Euler 9 at cfg 3 on its interval, 15
forwards per image; `fashion-mnist`'s default until 2026-12-07), in alternating rounds on this machine.

    python benchmarks/meanflow_race.py --meanflow weights/fashion-mnist-meanflow.safetensors --images 1000 --rounds 3

Every command writes 1,000 images (100 per class) to an .npz, as the scoring does, in a fresh folder each round; the
wall time of the process is the figure. The CPU model and the fp32 and bf16 matmul peaks are measured before and
after, and everything goes to benchmarks/results/meanflow-race-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_precision import cpu_model, matmul_peak

RESULTS = Path(__file__).resolve().parent / "results"


def commands(meanflow: Path, per_class: int) -> dict[str, list[str]]:
    """The contestants: the default by its registry name, the mean-flow file at one and two steps."""
    common = ["sample", "--num-per-class", str(per_class), "--seed", "0"]
    return {"flow default (fashion-mnist-flow, Euler 9, cfg 3 on its interval)": [*common, "--model",
                                                                                   "fashion-mnist-flow"],
            "mean flow, 2 steps": [*common, "--ckpt", str(meanflow), "--steps", "2"],
            "mean flow, 1 step": [*common, "--ckpt", str(meanflow), "--steps", "1"]}


def timed(args: list[str], folder: Path) -> float:
    """Seconds of one whole `dit sample` process writing its .npz into `folder`."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ditcli", *args, "--npz", str(folder / "out.npz")], check=True,
                   capture_output=True)
    return time.perf_counter() - started


def peaks() -> dict:
    return {"fp32_gflops": round(matmul_peak(torch.float32), 1), "bf16_gflops": round(matmul_peak(torch.bfloat16), 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meanflow", type=Path, required=True)
    parser.add_argument("--images", type=int, default=1000, help="Images per command (a multiple of 10).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "meanflow-race-cpu.json")
    args = parser.parse_args()
    contestants = commands(args.meanflow, args.images // 10)
    result = {"cpu": cpu_model(), "machine": platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "images": args.images, "peaks_before": peaks(), "rounds": []}
    for _ in range(args.rounds):
        seconds = {}
        for name, command in contestants.items():
            with tempfile.TemporaryDirectory() as folder:
                seconds[name] = timed(command, Path(folder))
        result["rounds"].append(seconds)
        print(json.dumps(seconds), flush=True)
    result["peaks_after"] = peaks()
    default = next(iter(contestants))
    median = {name: statistics.median(r[name] for r in result["rounds"]) for name in contestants}
    result["img_per_s"] = {name: args.images / s for name, s in median.items()}
    result["vs_default"] = {name: median[default] / s for name, s in median.items()}
    args.out.write_text(json.dumps(result, indent=1))
    for name in contestants:
        print(f"| {name} | {median[name]:.2f} s | {result['img_per_s'][name]:.1f} img/s | "
              f"{result['vs_default'][name]:.2f}x |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
