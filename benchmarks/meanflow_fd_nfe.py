"""FD against forwards per image for the three embedded Fashion-MNIST models: DDPM, flow and mean flow.

    python benchmarks/quality_per_second.py sweep --ckpt MEANFLOW_FILE      # the flow-map rows, 1,000 images each
    python benchmarks/quality_per_second.py score --ckpt MEANFLOW_FILE \
        --summary benchmarks/results/quality_per_second-meanflow.json
    python benchmarks/meanflow_fd_nfe.py                                      # docs/images/meanflow-fd-nfe.png + table

Every point is 1,000 images (100 per class, seed 0) scored in the judge's features against the train split, as
benchmarks/quality_per_second.py scores them, so the three models' summaries are comparable. Each model is drawn
with its own best sampler family: DDPM's DPM-Solver++(2M) and flow's Euler, both guided at cfg 4 on EDM2's interval,
plus the flow model's shipped default (Euler 9 at cfg 3 on the interval) as a star; the mean-flow model's flow map at
cfg 1 (its guidance is trained in). The x axis counts forwards: a guided step's conditional and unconditional halves
are two.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SUMMARIES = {"ddpm": RESULTS / "quality_per_second.json", "flow": RESULTS / "quality_per_second-flow-anneal.json",
             "meanflow": RESULTS / "quality_per_second-meanflow.json"}
# (model, sampler, guidance interval, cfg): the curves drawn, with their labels and colours.
CURVES = (("ddpm", "dpm++2m", True, 4.0, "DDPM model, DPM-Solver++(2M), cfg 4 on the interval", "tab:orange"),
          ("flow", "euler", True, 4.0, "flow model, Euler, cfg 4 on the interval", "tab:purple"),
          ("meanflow", "flow-map", False, 1.0, "mean-flow model, flow map (guidance trained in)", "tab:cyan"))
DEFAULT = ("flow", "euler-9-gi-g3", "flow model's default: Euler 9, cfg 3 on the interval (15 forwards)")
PLOT = ROOT / "docs" / "images" / "meanflow-fd-nfe.png"


def seed0_rows(summary: dict) -> list[dict]:
    """The 1,000-image, seed-0, fp32 rows of a summary."""
    return [r for r in summary["rows"] if r["seed"] == 0 and r["images"] >= 1000 and r["precision"] == "fp32"]


def curve(summary: dict, sampler: str, interval: bool, cfg: float) -> list[tuple[float, float, dict]]:
    rows = [r for r in seed0_rows(summary)
            if r["sampler"] == sampler and r["interval"] == interval and r.get("cache") is None
            and r.get("cfg", 4.0) == cfg]
    return sorted((r["forwards_per_image"], r["fd"], r) for r in rows)


def draw(summaries: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7.5, 4.5))
    for model, sampler, interval, cfg, label, colour in CURVES:
        points = curve(summaries[model], sampler, interval, cfg) if model in summaries else []
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], "-o", color=colour, label=label)
    model, row, label = DEFAULT
    star = [r for r in seed0_rows(summaries[model]) if r["row"] == row]
    if star:
        axis.plot(star[0]["forwards_per_image"], star[0]["fd"], "*", color="black", markersize=12, label=label)
    floor = summaries["flow"]["floor"][0]["fd"]
    axis.axhline(floor, color="gray", lw=1)
    axis.text(1.05, floor + 1.5, "floor: 1,000 real test images", color="gray", fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("forwards per image")
    axis.set_ylabel("FD in fashion-judge features vs the train split")
    axis.set_title("Embedded Fashion-MNIST models: quality against forwards (1,000 images each)", fontsize=10)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def table(summaries: dict) -> str:
    lines = ["| model | sampler | steps | cfg | forwards/image | FD | judge accuracy |", "|---|---|---|---|---|---|---|"]
    for model, sampler, interval, cfg, _, _ in CURVES:
        for forwards, fd, r in curve(summaries.get(model, {"rows": []}), sampler, interval, cfg):
            lines.append(f"| {model} | {sampler} | {r['steps']} | {cfg:g} | {forwards} | {fd:.2f} | "
                         f"{r['accuracy'] * 100:.1f}% |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    summaries = {name: json.loads(path.read_text()) for name, path in SUMMARIES.items() if path.exists()}
    draw(summaries, args.plot)
    print(table(summaries))
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
