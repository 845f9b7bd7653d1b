"""FD over training from a run's kept checkpoints, by the code `dit train --eval-every` runs (ditcli.evaluation).

    python benchmarks/fd_over_training.py runs/fashion-flow --ref fm-judge-ref.npz --features fashion-judge \\
        --num 1000 --plot docs/images/fashion-flow-fd-over-training.png

For a run trained without `--eval-every`: each ckpt-*.pt's EMA draws --num images with the checkpoint's own default
sampler (or --sampler/--steps), scored against --ref. This is the record the run would have logged at that step.
Results are cached per checkpoint in RUN/eval/, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch

from ditcli.diffusion.samplers import SamplingDefaults
from ditcli.model.codec import codec_from_dict
from ditcli.ranks import Ranks
from ditcli.training.eval_hook import EvalRequest, eval_config, evaluate_ema
from ditcli.weights.checkpoint import load_checkpoint


def evaluate_checkpoint(path: Path, args, reference: dict) -> dict:
    # The cached record is keyed by everything that decides it, so a rerun with another sampler, step count,
    # feature extractor or reference scores afresh instead of reusing the old figures.
    key = hashlib.sha256(json.dumps([args.sampler, args.steps, args.features, str(args.ref.resolve())]).encode())
    stem = f"{path.stem}-n{args.num}-{key.hexdigest()[:8]}"
    record_path = path.parent / "eval" / f"{stem}.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    checkpoint = load_checkpoint(path)
    model = checkpoint.build("cpu")
    codec = codec_from_dict(checkpoint.codec, torch.device("cpu"), model.config.in_channels, None, True)
    sampling = checkpoint.sampling or SamplingDefaults()
    if args.sampler or args.steps:  # either one alone overrides the checkpoint's own
        sampling = replace(sampling, sampler=args.sampler or sampling.sampler, steps=args.steps or sampling.steps)
    train = torch.load(path, weights_only=True, map_location="cpu")["config"]["train"]
    config = eval_config(model.config.num_classes, sampling, checkpoint.objective, checkpoint.schedule, args.num,
                         int(train.get("seed", 0)))
    request = EvalRequest(1, args.ref, args.num, args.features)
    record = evaluate_ema(model, codec, config, request, path.parent / "eval" / f"{stem}.npz",
                          Ranks(), torch.device("cpu"), int(checkpoint.step or 0), reference)
    record.update(sampler=sampling.sampler, steps=sampling.steps, cfg=sampling.cfg)
    record_path.write_text(json.dumps(record, indent=1))
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--features", default="inception")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--sampler", default=None, help="Instead of each checkpoint's own default sampler.")
    parser.add_argument("--steps", type=int, default=None, help="Instead of the sampler's recorded steps.")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    reference = {}  # the reference's activations, extracted once for every checkpoint
    records = [evaluate_checkpoint(path, args, reference) for path in sorted(args.run.glob("ckpt-*.pt"))]
    for record in records:
        print(json.dumps({k: record[k] for k in ("step", "fd", "kid", "eval_seconds", "sampler", "steps")}))
    if args.plot and records:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axis = plt.subplots(figsize=(5, 3.4))
        axis.plot([r["step"] for r in records], [r["fd"] for r in records], "-o", ms=3)
        axis.set_xlabel("training step")
        axis.set_ylabel(f"FD ({args.features} features, {args.num} images)")
        axis.set_title(args.title or f"{args.run.name}: FD of the EMA over training", fontsize=10)
        axis.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
