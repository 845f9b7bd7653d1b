"""FD against training steps for every run of benchmarks/align_study.sh, in one figure, and the steps each run took
to reach the baseline's last FD.

    python benchmarks/align_study_plot.py ~/dit-runs/align-study --out docs/images/align-study.png

Reads the `fd` rows that `dit train --eval-every` appends to each run's metrics.jsonl (run folders: the
subfolders that hold one). Prints, per run, its FD at each evaluation and the first step at which it reached the
baseline's final FD (the issue's goal: a third of the baseline's steps or fewer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def fd_curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sorted((row["step"], row["fd"]) for row in rows if "fd" in row)


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose FD is at or below `target`; None if the run never got there."""
    return next((step for step, fd in curve if fd <= target), None)


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [fd for _, fd in curve], marker="o", markersize=3, label=name)
    ax.set_xlabel("training step (batch 128)")
    ax.set_ylabel("FD, fashion-judge features")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--baseline", default="baseline")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    curves = {run.name: fd_curve(run) for run in sorted(args.study.iterdir()) if (run / "metrics.jsonl").is_file()}
    curves = {name: curve for name, curve in curves.items() if curve}
    target = curves[args.baseline][-1][1] if args.baseline in curves else None
    for name, curve in curves.items():
        reached = steps_to(curve, target) if target is not None else None
        print(f"{name}: " + ", ".join(f"{step}: {fd:.1f}" for step, fd in curve)
              + (f"; baseline's final FD {target:.1f} reached at step {reached}" if target is not None else ""))
    if args.out is not None:
        plot(curves, args.out)


if __name__ == "__main__":
    main()
