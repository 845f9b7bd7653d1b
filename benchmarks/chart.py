"""Tables (markdown) and a PNG chart from benchmarks/results/model-<device>.json.

    python benchmarks/chart.py benchmarks/results/model-cpu.json     # prints tables, writes docs/images/bench-cpu.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.get(key, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forward = [r for r in result["rows"] if r["bench"] == "forward" and "seconds" in r]
    sampling = [r for r in result["rows"] if r["bench"] == "sampling"]
    train = [r for r in result["rows"] if r["bench"] == "train_step"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    labels = [f"{r['model']}\n{r['impl']} {r['precision']}" for r in forward]
    left.barh(labels, [r["speedup_vs_diffusers_fp32"] for r in forward], color="tab:blue")
    left.axvline(1.0, color="gray", lw=1)
    left.set_xlabel("forward speed-up vs diffusers fp32 (higher is better)")
    left.tick_params(axis="y", labelsize=7)
    middle.barh([f"cfg {r['cfg']:g}\n{r['impl']} {r['precision']}" for r in sampling],
                [r["speedup_vs_dit_pipeline"] for r in sampling], color="tab:orange")
    middle.axvline(1.0, color="gray", lw=1)
    middle.set_xlabel(f"{sampling[0]['model']} DDIM-{sampling[0]['steps']} loop speed-up vs DiTPipeline")
    middle.tick_params(axis="y", labelsize=7)
    right.barh([f"{r['impl']} {r['precision']}" for r in train], [r["speedup_vs_reference_fp32"] for r in train],
               color="tab:green")
    right.axvline(1.0, color="gray", lw=1)
    right.set_xlabel(f"{train[0]['model']} training step speed-up vs reference-style fp32")
    fig.suptitle(f"{result['device']}, torch {result['torch']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    source = Path(sys.argv[1])
    result = json.loads(source.read_text())
    rows = result["rows"]
    print(f"Device: {result['device']}, torch {result['torch']}; matmul peak "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in result["matmul_peak_gflops"].items()) + "\n")
    print(table([r for r in rows if r["bench"] == "forward" and "seconds" in r],
                [("model", "model"), ("batch", "batch"), ("impl", "impl"), ("precision", "precision"),
                 ("s/forward", "seconds"), ("img/s", "img_per_s"), ("vs diffusers fp32", "speedup_vs_diffusers_fp32"),
                 ("MFU", "mfu"), ("drift vs fp32", "max_abs_drift_vs_fp32")]) + "\n")
    print(table([r for r in rows if r["bench"] == "sampling"],
                [("model", "model"), ("batch", "batch"), ("steps", "steps"), ("cfg", "cfg"), ("impl", "impl"),
                 ("precision", "precision"), ("s/loop", "seconds"), ("img/s", "img_per_s"),
                 ("vs DiTPipeline", "speedup_vs_dit_pipeline"), ("MFU", "mfu")]) + "\n")
    print(table([r for r in rows if r["bench"] == "train_step"],
                [("model", "model"), ("batch", "batch"), ("impl", "impl"), ("precision", "precision"),
                 ("s/step", "seconds"), ("img/s", "img_per_s"), ("vs reference fp32", "speedup_vs_reference_fp32"),
                 ("MFU", "mfu")]))
    out = ROOT / "docs" / "images" / f"bench-{source.stem.removeprefix('model-')}.png"
    chart(result, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
