"""Plot a run's TensorBoard scalars, read back from its event files with TensorBoard's own reader.

    python benchmarks/tensorboard_plot.py runs/fashion-flow/tensorboard --out docs/images/fashion-flow-tensorboard.png

Draws train/loss, train/lr, train/grad_norm and train/img_per_s, and eval/fd where the run evaluated, as TensorBoard
shows them: what `dit train --log tensorboard` wrote, purged of the points of interrupted runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PANELS = ("train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "eval/fd")


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}, purge_orphaned_data=True)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(args.logdir)
    shown = [tag for tag in PANELS if scalars.get(tag)]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.2), squeeze=False)
    for axis, tag in zip(axes[0], shown):
        steps, values = zip(*scalars[tag])
        axis.plot(steps, values, "-o" if len(steps) < 30 else "-", lw=1, ms=3)
        axis.set_title(tag, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    fig.suptitle(args.title or str(args.logdir), fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}: {', '.join(f'{t} ({len(scalars[t])} points)' for t in shown)}")


if __name__ == "__main__":
    main()
