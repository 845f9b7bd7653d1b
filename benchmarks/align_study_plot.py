"""FD against training steps for every run of benchmarks/align_study.sh in one figure, the shipped model's FD in the
same protocol as a line, and the steps each run took to reach the baseline's last FD.

    python benchmarks/align_study_plot.py ~/dit-runs/align-study-4006 --out docs/images/align-study.png

Reads the `fd` rows that `dit train --eval-every` appends to each run's metrics.jsonl (run folders: the subfolders
that hold one) and STUDY/shipped-eval.json, the shipped 12,017-step model scored by align_study.sh in the same
protocol (without it, no line). A run still training is drawn and reported as far as it got, marked partial; a run
with no evaluation yet is left out. Prints, per run, its FD at each evaluation, its last FD, the step at which it
first reached the baseline's last FD (the first evaluation at or below it, and that step linearly interpolated
between the two evaluations around it), and whether it reached the shipped model's FD: the issue's goal is that FD
in a third of the shipped model's steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

Curve = list[tuple[int, float]]  # (step, FD) of each evaluation, by step


def fd_curve(run: Path) -> Curve:
    """The run's evaluations; a last line still being written by a running `dit train` is skipped."""
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return sorted((row["step"], row["fd"]) for row in rows if "fd" in row)


def last_due(run: Path) -> int | None:
    """The step of the run's last evaluation once it has finished (from its run.json); None if it does not say."""
    path = run / "run.json"
    if not path.is_file():
        return None
    train = json.loads(path.read_text()).get("train", {})
    steps, every = train.get("steps"), train.get("eval_every")
    return steps // every * every if steps and every else None


def steps_to(curve: Curve, target: float) -> int | None:
    """The first evaluated step whose FD is at or below `target`; None if the run never got there."""
    return next((step for step, fd in curve if fd <= target), None)


def steps_to_interpolated(curve: Curve, target: float) -> float | None:
    """The step at which the FD, drawn linearly between evaluations, first reaches `target` (the first evaluation's
    step if that one is already at or below it); None if the run never got there."""
    for (step0, fd0), (step1, fd1) in zip([(None, None), *curve], curve):
        if fd1 <= target:
            return step1 if step0 is None else step0 + (step1 - step0) * (fd0 - target) / (fd0 - fd1)
    return None


def shipped_fd(study: Path) -> float | None:
    """The shipped model's FD from align_study.sh's STUDY/shipped-eval.json; None before it is made."""
    path = study / "shipped-eval.json"
    return json.loads(path.read_text())["fd"] if path.is_file() else None


def report(name: str, curve: Curve, partial: bool, target: tuple[int, float] | None, shipped: float | None) -> str:
    """Lines for one run: its evaluations, its last FD, its steps to the baseline's last FD and the shipped FD."""
    step, fd = curve[-1]
    lines = [f"{name}{' (partial)' if partial else ''}: " + ", ".join(f"{s}: {f:.1f}" for s, f in curve),
             f"  last FD {fd:.1f} at step {step}"]
    if target is not None:
        reached, interpolated = steps_to(curve, target[1]), steps_to_interpolated(curve, target[1])
        if reached is None:
            lines.append(f"  baseline's last FD {target[1]:.1f} (its step {target[0]}): not reached"
                         + (" yet" if partial else ""))
        else:
            fewer = f" ({target[0] / interpolated:.2f}x fewer steps)" if interpolated < target[0] else ""
            lines.append(f"  baseline's last FD {target[1]:.1f} (its step {target[0]}): first evaluation at or below "
                         f"it at step {reached}, interpolated step {interpolated:.0f}{fewer}")
    if shipped is not None:
        below = steps_to(curve, shipped)
        lines.append(f"  shipped model's FD {shipped:.1f}: " + (f"reached at step {below}" if below is not None else
                                                                 f"not reached (last FD {fd - shipped:.1f} above it)"))
    return "\n".join(lines)


def plot(curves: dict[str, Curve], partial: set[str], path: Path, target: tuple[int, float] | None,
         shipped: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [fd for _, fd in curve], marker="o", markersize=3,
                linestyle="--" if name in partial else "-", label=name + (" (partial)" if name in partial else ""))
    if target is not None:
        ax.axhline(target[1], color="gray", linestyle=":", linewidth=1,
                   label=f"baseline's FD at step {target[0]:,} ({target[1]:.1f})")
    if shipped is not None:
        ax.axhline(shipped, color="black", linewidth=1.2, label=f"shipped model, 12,017 steps ({shipped:.1f})")
    ax.set_xlabel("training step (batch 128)")
    ax.set_ylabel("FD, fashion-judge features (log scale)")
    ax.set_title("FD of 1,000 images, Euler 9, cfg 3 on every step")
    ax.set_yscale("log")
    ax.set_yticks([50, 60, 80, 100, 150, 200, 300, 500, 700])
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--baseline", default="baseline")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = [run for run in sorted(args.study.iterdir()) if (run / "metrics.jsonl").is_file()]
    curves = {run.name: curve for run in runs if (curve := fd_curve(run))}
    partial = {run.name for run in runs
               if run.name in curves and (due := last_due(run)) is not None and curves[run.name][-1][0] < due}
    target = curves[args.baseline][-1] if args.baseline in curves else None
    shipped = shipped_fd(args.study)
    if shipped is not None:
        print(f"shipped model (12,017 steps), same protocol: FD {shipped:.1f} ({args.study / 'shipped-eval.json'})")
    if args.baseline in partial:
        print(f"{args.baseline} is partial: its last FD is not its final one")
    for name, curve in curves.items():
        print(report(name, curve, name in partial, target, shipped))
    if args.out is not None:
        plot(curves, partial, args.out, target, shipped)


if __name__ == "__main__":
    main()
