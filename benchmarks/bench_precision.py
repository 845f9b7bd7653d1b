"""The denoiser forward in each precision path, as a share of this machine's bf16 matmul peak.

    python benchmarks/bench_precision.py --models DiT-S/2 DiT-B/2 DiT-XL/2 --batch 4 2 2

Variants, timed in alternation: fp32; bf16 autocast (what `--precision bf16` did before); bf16 weights cast once
(`generate.CastWeights`, what it does now); and the same compiled with inductor freezing (`generate.compiled`,
what `--compile` adds). The peak is the best of several square matmul sizes, measured at the start and at the end of
the run. Writes benchmarks/results/precision-cpu.json with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ditcli.model.dit import DiT, forward_macs, preset
from ditcli.sampling.forward import CastWeights, compiled

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048, 4096)) -> float:
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def variants(name: str, batch: int) -> tuple[dict, int, dict]:
    """The callables to time, the forward's FLOPs and the compile seconds."""
    torch.manual_seed(0)
    model = DiT(preset(name, input_size=32)).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key != "pos_embed":
                p.add_(torch.randn_like(p) * 0.02)
    x, t, y = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,)), torch.randint(0, 1000, (batch,))
    cast = CastWeights(model, torch.bfloat16)
    frozen = compiled(CastWeights(model, torch.bfloat16))
    start = time.perf_counter()
    frozen(x, t, y)
    compile_s = time.perf_counter() - start

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, t, y)

    fns = {"fp32": lambda: model(x, t, y), "bf16 autocast": autocast, "bf16 weights": lambda: cast(x, t, y),
           "bf16 weights + freezing": lambda: frozen(x, t, y)}
    return fns, 2 * forward_macs(model.config) * batch, {"compile_s": compile_s}


def timed(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2", "DiT-XL/2"])
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 4, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "precision-cpu.json")
    args = parser.parse_args()
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "peaks_before": {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}, "rows": []}
    print(json.dumps(result), flush=True)
    with torch.no_grad():
        for name, batch in zip(args.models, args.batch):
            fns, flops, extra = variants(name, batch)
            for variant, seconds in timed(fns, args.repeats).items():
                row = {"model": name, "batch": batch, "variant": variant, "ms": round(seconds * 1e3, 1),
                       "gflops": round(flops / seconds / 1e9, 1), **extra}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    result["peaks_after"] = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    peak = max(result["peaks_before"]["bf16"], result["peaks_after"]["bf16"])
    for row in result["rows"]:
        row["share_of_bf16_peak"] = round(row["gflops"] / peak, 3)
    args.out.write_text(json.dumps(result, indent=1))
    for row in result["rows"]:
        print(f"{row['model']} b{row['batch']} {row['variant']:24s} {row['ms']:8.1f} ms "
              f"{row['share_of_bf16_peak'] * 100:5.1f}% of the bf16 peak ({peak:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
