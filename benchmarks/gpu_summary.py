"""Summarise a benchmarks/gpu.sh run: MFU of the DiT-XL/2 training step and sampling, ratios against diffusers, and
the GPU tests' outcomes and figures, into OUT_DIR/summary.json.

    python benchmarks/gpu_summary.py OUT_DIR

MFU is given twice: against the bf16 matmul peak measured in the same run (bench_model.py's `mfu`) and against the
nominal dense bf16 peak of the card where it is known (989 TFLOP/s for H100 SXM and H200).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
TARGETS = {"train_mfu": 0.45, "sampling_mfu": 0.50}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def nominal_peak_gflops(device: str) -> float | None:
    for name, tflops in NOMINAL_BF16_TFLOPS.items():
        if name in device:
            return tflops * 1e3
    return None


def best(rows: list[dict], **match) -> dict | None:
    """The fastest of our rows that match (compiled or not)."""
    ours = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get("impl", "").startswith("ours")]
    return max(ours, key=lambda r: r["gflops"], default=None)


def figures(row: dict | None, nominal: float | None, ratio_key: str) -> dict | None:
    if row is None:
        return None
    return {"impl": row["impl"], "precision": row["precision"], "batch": row.get("batch"),
            "img_per_s": round(row["img_per_s"], 2), "tflops": round(row["gflops"] / 1e3, 1),
            "mfu_measured_peak": round(row.get("mfu", float("nan")), 3),
            "mfu_nominal_peak": round(row["gflops"] / nominal, 3) if nominal else None,
            ratio_key: round(row[ratio_key], 2) if ratio_key in row else None}


def summarise(out: Path) -> dict:
    model = _read_json(out / "model.json") or {"rows": []}
    rows, device = model["rows"], model.get("device", "unknown")
    nominal = nominal_peak_gflops(device)
    train = figures(best(rows, bench="train_step"), nominal, "speedup_vs_reference_fp32")
    sampling = {f"cfg{cfg:g}": figures(best(rows, bench="sampling", cfg=cfg), nominal, "speedup_vs_dit_pipeline")
                for cfg in (4.0, 1.0)}
    forward = [{"model": r["model"], "impl": r["impl"], "precision": r["precision"],
                "speedup_vs_diffusers_fp32": round(r["speedup_vs_diffusers_fp32"], 2)}
               for r in rows if r.get("bench") == "forward" and "speedup_vs_diffusers_fp32" in r]
    log = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", log)}
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "steps.jsonl").exists() else []

    def meets(value: dict | None, target: float) -> bool | None:
        key = "mfu_nominal_peak" if nominal else "mfu_measured_peak"
        return None if value is None or value.get(key) is None else value[key] >= target

    return {"device": device, "torch": model.get("torch"), "matmul_peak_gflops": model.get("matmul_peak_gflops"),
            "nominal_bf16_peak_gflops": nominal, "train_step": train, "sampling": sampling, "forward": forward,
            "targets": {"train_mfu": TARGETS["train_mfu"], "train_met": meets(train, TARGETS["train_mfu"]),
                        "sampling_mfu": TARGETS["sampling_mfu"],
                        "sampling_met": meets(sampling["cfg4"], TARGETS["sampling_mfu"])},
            "race": race_ratio(_read_json(out / "race.json")),
            "tests": counts, "test_figures": _read_json(out / "gpu-tests.json"), "steps": steps}


def race_ratio(race: dict | None) -> dict | None:
    """DiTPipeline's seconds over ours, per precision, from race_pipeline.py (> 1: `dit sample` is faster)."""
    if race is None:
        return None
    return {precision: round(race[precision]["ratio_of_medians"], 3) for precision in ("bf16", "fp32")
            if precision in race}


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu")
    summary = summarise(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("device", "train_step", "sampling", "race", "targets", "tests")},
                     indent=1))


if __name__ == "__main__":
    main()
