"""FID while training (`dit train --eval-every N --eval-ref REF.npz`).

At every Nth step, K images are drawn from the EMA weights with the model's own default sampler. They are the
images `dit sample --ckpt ckpt-N.pt --num-images K --seed SEED` would draw. Under torchrun the ranks split them. They
are written as an ADM .npz, and rank 0 scores that file with `dit fid`'s own `metrics.evaluate`, so the number
logged is the number `dit fid` gives on the same file. The draws come from per-image generators, and the global RNG
is restored afterwards, so a run with and without evaluation trains the same weights. Nothing here prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ditcli.diffusion.guidance import DEFAULT_CHANNELS, Guidance
from ditcli.diffusion.objectives import Objective
from ditcli.diffusion.samplers import SamplingDefaults
from ditcli.errors import UserError
from ditcli.evaluation.features import INCEPTION
from ditcli.evaluation.fid import FidConfig, evaluate, reference_activations
from ditcli.runtime import set_backend_flags
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.generate import random_labels, sample_run
from ditcli.sampling.writers import NpzWriter

EVAL_BATCH = 64  # images per forward while evaluating; the images do not depend on it


@dataclass(frozen=True)
class EvalRequest:
    """What `--eval-*` asks for: every `every` steps, `num` images scored against `ref` in `features`."""

    every: int
    ref: Path
    num: int
    features: str = INCEPTION

    def check(self) -> None:
        """The reference must be readable before training starts (checked on every rank)."""
        if not self.ref.is_file():
            raise UserError(f"--eval-ref {self.ref} not found",
                            "make one with `dit fid --make-ref DATA -o REF.npz` (add --features to match)")

    def due(self, step: int) -> bool:
        """The decision comes from the step alone, so every rank takes it alike."""
        return self.every > 0 and step % self.every == 0


class Evaluator:
    """FD while training: whether an evaluation is due (`due`), running it (`__call__`), the reference's activations
    kept between evaluations, and the seconds spent, which the loop keeps out of its img/s."""

    def __init__(self, request: EvalRequest | None, out: Path):
        self.request, self.out = request, Path(out)
        self.reference: dict = {}  # the reference's activations, extracted once
        self.seconds = 0.0

    @classmethod
    def from_config(cls, config, out: Path) -> Evaluator:
        """From a TrainConfig's --eval-* slice; an evaluator that is never due without --eval-every."""
        request = None if not config.eval_every else EvalRequest(
            config.eval_every, Path(config.eval_ref), config.eval_num, config.eval_features)
        return cls(request, out)

    def due(self, step: int) -> bool:
        return self.request is not None and self.request.due(step)

    def __call__(self, model, codec, config: GenerateConfig, ranks, device, step: int) -> dict | None:
        """Evaluate the EMA `model` at `step` into out/eval/step-<step>.npz; rank 0 gets the record, others None."""
        started = time.perf_counter()
        path = self.out / "eval" / f"step-{step:07d}.npz"
        record = evaluate_ema(model, codec, config, self.request, path, ranks, device, step, self.reference)
        self.seconds += time.perf_counter() - started
        return record


def eval_config(num_classes: int, sampling: SamplingDefaults, objective: Objective, schedule: str, num: int,
                seed: int) -> GenerateConfig:
    """`dit sample --num-images num --seed seed` with the model's defaults: random classes, its sampler and cfg."""
    labels = random_labels(num, seed, range(num_classes)) if num_classes else [0] * num
    guidance = Guidance(sampling.cfg if num_classes else 1.0, DEFAULT_CHANNELS, sampling.interval)
    return GenerateConfig(tuple(labels), seed, sampling.sampler, sampling.steps, 0.0, guidance, EVAL_BATCH,
                          schedule=schedule, objective=objective)


def provenance_of(config: GenerateConfig, model, codec, step: int) -> dict:
    """The sidecar `dit fid` reads: how the images were drawn."""
    return {"model": f"EMA at training step {step}", "model_config": model.config.to_dict(), "step": step,
            "sampler": config.sampler, "steps": config.steps, "cfg": config.guidance.scale,
            "guidance_channels": config.guidance.channels,
            "guidance_interval": list(config.guidance.interval) if config.guidance.interval else None,
            "codec": codec.to_dict(), "precision": config.precision, "seed": config.seed,
            "num_images": config.num_images, "objective": config.objective.to_metadata()}


def evaluate_ema(model, codec, config: GenerateConfig, request: EvalRequest, path: Path, ranks, device,
                 step: int, reference: dict | None = None) -> dict | None:
    """Sample `config` into `path` across the ranks, then score it on rank 0; rank 0 gets the record, others None.

    `reference` is the caller's cache of the reference's activations, kept between evaluations: a 60,000-image
    reference is read through the feature extractor once per run, not once per evaluation.
    """
    started = time.perf_counter()
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    writer = NpzWriter(path, ranks.rank)
    if ranks.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.prepare(config.run_key(f"ema-step-{step}", codec.to_dict()), force=True)
    ranks.barrier()
    sample_run(model, codec, config, device, [writer], ranks, provenance_of(config, model, codec, step))
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    if ranks.rank != 0:
        return None
    set_backend_flags(allow_tf32=False, autotune=False)  # as `dit fid` scores
    try:
        fid_config = FidConfig(path, request.ref, features=request.features, precision_recall=False)
        cache = {} if reference is None else reference
        if "activations" not in cache:
            cache["activations"] = reference_activations(fid_config, device)
        result = evaluate(fid_config, device, ref_acts=cache["activations"])
    finally:
        set_backend_flags()  # back to training's TF32 and autotuning
    return {"step": step, "fd": result.fid, "kid": result.kid, "eval_num": result.num_samples,
            "eval_features": result.features, "eval_seconds": round(time.perf_counter() - started, 3),
            "eval_npz": str(path)}
