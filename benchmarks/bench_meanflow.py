"""What a mean-flow training step costs against a flow step, and what one-step sampling buys, on this machine.

    python benchmarks/bench_meanflow.py [--batch 64] [--rounds 5] [--precision fp32 bf16]

Training: `Trainer.train_step` of the embedded model's shape (DiT-S/4 at width 192 on 28x28, 10 classes) on synthetic
images, for the flow objective and for mean flow in both forms, without and with trained model guidance; the
variants are timed in alternation, round by round, and the median kept. Sampling: the flow-map sampler at 1 and 2
steps against flow Euler 9 at cfg 3 (the shipped default's sampler, guided on every step here), images per second
through `sample_latents`. The fp32 and bf16 matmul peaks and the CPU model are recorded in the same run; figures are
comparable only within one run. Writes benchmarks/results/meanflow-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_precision import cpu_model, matmul_peak

from ditcli.data.sources import ImageSet
from ditcli.diffusion.guidance import Guidance
from ditcli.diffusion.objectives import FlowObjective, MeanFlowObjective
from ditcli.model.dit import DiT, preset
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.generate import sample_latents
from ditcli.training.config import TrainConfig
from ditcli.training.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(model="DiT-S/4", image_size=28, channels=1, vae=None, hidden_size=192, depth=6, num_heads=3,
             learn_sigma=False, flip=False)
VARIANTS = {
    "flow": dict(objective="flow"),
    "meanflow separate": dict(objective="meanflow"),
    "meanflow decoupled": dict(objective="meanflow", decoupled_depth=4),
    "meanflow decoupled, model guidance": dict(objective="meanflow", decoupled_depth=4, train_guidance="model",
                                               train_omega=0.6667, train_guidance_interval="0.156,0.781"),
}


def trainers(batch: int, precision: str, folder: Path, variants: dict, shape: dict) -> dict[str, Trainer]:
    """One set-up Trainer per variant (`shape` and the variant's options), each warmed up by one step, on synthetic
    images; bench_align.py builds its variants here too."""
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 256, (4 * batch, 28, 28, 1), dtype=np.uint8), np.arange(4 * batch) % 10,
                      [str(i) for i in range(10)], "synthetic")
    built = {}
    for name, options in variants.items():
        config = TrainConfig(data="synthetic", out=str(folder / name.replace(" ", "-").replace(",", "")),
                             global_batch=batch, steps=10**6, precision=precision, device="cpu", **shape, **options)
        built[name] = Trainer(config, images=images)
        built[name].setup()
        built[name].train_step()  # warm-up
    return built


def step_seconds(runs: dict[str, Trainer], rounds: int) -> dict[str, list[float]]:
    """Each trainer's `train_step`, timed in alternation, round by round, so drift in the machine's speed hits all."""
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, trainer in runs.items():
            start = time.perf_counter()
            trainer.train_step()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def time_training(batch: int, precision: str, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        seconds = step_seconds(trainers(batch, precision, Path(folder), VARIANTS, SHAPE), rounds)
    flow = statistics.median(seconds["flow"])
    return {name: {"step_s": round(statistics.median(s), 3), "img_per_s": round(batch / statistics.median(s), 1),
                   "vs_flow": round(statistics.median(s) / flow, 2)} for name, s in seconds.items()}


def time_sampling(batch: int, precision: str, rounds: int) -> dict:
    flow_model = DiT(preset("DiT-S/4", input_size=28, in_channels=1, hidden_size=192, depth=6, num_heads=3,
                            num_classes=10, learn_sigma=False)).eval()
    mean_model = DiT(preset("DiT-S/4", input_size=28, in_channels=1, hidden_size=192, depth=6, num_heads=3,
                            num_classes=10, learn_sigma=False, mean_flow_form="decoupled", decoupled_depth=4)).eval()
    labels = tuple(i % 10 for i in range(batch))
    jobs = {"flow euler 9, cfg 3": (flow_model, GenerateConfig(labels, sampler="euler", steps=9, guidance=Guidance(3.0),
                                                               precision=precision, batch_size=batch,
                                                               objective=FlowObjective())),
            "mean flow, 1 step": (mean_model, GenerateConfig(labels, sampler="flow-map", steps=1, precision=precision,
                                                             batch_size=batch, objective=MeanFlowObjective())),
            "mean flow, 2 steps": (mean_model, GenerateConfig(labels, sampler="flow-map", steps=2, precision=precision,
                                                              batch_size=batch, objective=MeanFlowObjective()))}
    seconds = {name: [] for name in jobs}
    for _ in range(rounds + 1):  # the first round warms up
        for name, (model, config) in jobs.items():
            plan = config.plan(False)
            start = time.perf_counter()
            sample_latents(model, plan, config, list(range(batch)), batch, torch.device("cpu"))
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["flow euler 9, cfg 3"][1:])
    return {name: {"img_per_s": round(batch / statistics.median(s[1:]), 1),
                   "speedup_vs_euler9": round(base / statistics.median(s[1:]), 2)} for name, s in seconds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", nargs="+", default=["fp32"])
    parser.add_argument("--out", type=Path, default=RESULTS / "meanflow-cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "batch": args.batch, "rounds": args.rounds,
              "peaks_gflops": {"fp32": round(matmul_peak(torch.float32)), "bf16": round(matmul_peak(torch.bfloat16))}}
    for precision in args.precision:
        result[f"training_{precision}"] = time_training(args.batch, precision, args.rounds)
        result[f"sampling_{precision}"] = time_sampling(args.batch, precision, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
