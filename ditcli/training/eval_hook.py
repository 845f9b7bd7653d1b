"""FID while training (`dit train --eval-every N --eval-ref REF.npz`).

At every Nth step, K images are drawn from the EMA weights with the model's own default sampler, or the one
--eval-sampler, --eval-steps and --eval-cfg name. They are the images `dit sample --ckpt ckpt-N.pt --num-images K
--seed SEED` (with the same sampler options) would draw. Under torchrun the ranks split them. They are written as an
ADM .npz, and rank 0 scores that file with `dit fid`'s own `metrics.evaluate`, so the number logged is the number
`dit fid` gives on the same file. The draws come from per-image generators, and the global RNG is restored
afterwards, so a run with and without evaluation trains the same weights. Nothing here prints: the evaluation calls
back with its start, its progress (`eval_start`, `eval_progress`) and the warnings `dit fid` would show (`warning`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ditcli.diffusion.guidance import DEFAULT_CHANNELS, Guidance
from ditcli.diffusion.objectives import Objective
from ditcli.diffusion.samplers import SamplingDefaults
from ditcli.errors import UserError
from ditcli.evaluation.features import (
    DINOV2,
    INCEPTION,
    Activations,
    Progress,
    extract,
    load_feature_extractor,
)
from ditcli.evaluation.fid import FidConfig, evaluate, extractor_weights, features_for
from ditcli.evaluation.references import open_reference
from ditcli.runtime import set_backend_flags
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.generate import random_labels, sample_run
from ditcli.sampling.writers import NpzWriter

EVAL_BATCH = 64  # images per forward while evaluating; the images do not depend on it
Emit = Callable[[str, dict], None]  # the trainer's on_event


@dataclass(frozen=True)
class EvalRequest:
    """What `--eval-*` asks for: every `every` steps, `num` images scored against `ref` in `features`, drawn with
    `sampler`, `steps` and `cfg` (None: the model's own)."""

    every: int
    ref: Path
    num: int
    features: str = INCEPTION
    sampler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    dinov2_weights: str | None = None  # --dinov2-weights: the DINOv2 file of --eval-features dinov2

    @property
    def weights(self) -> str | None:
        """The weight file of the extractor, as `dit fid` takes it: --dinov2-weights for dinov2 features only."""
        return self.dinov2_weights if self.features == DINOV2 else None

    def check(self, load_extractor: bool = True) -> None:
        """Before training starts: the reference reads as one, in features the evaluation can score against (its
        images, or statistics in `features`), and the feature extractor loads (on the CPU, then dropped; rank 0, which
        scores, passes `load_extractor`)."""
        if not self.ref.exists():
            raise UserError(f"--eval-ref {self.ref} not found",
                            "make one with `dit fid --make-ref DATA -o REF.npz` (add --features to match)")
        ref = open_reference(self.ref)
        features = features_for(FidConfig(self.ref, self.ref, features=self.features), ref)
        if ref.images is None and ref.features != features:
            raise UserError(f"--eval-ref {self.ref} holds {ref.features} statistics and no images, and --eval-features "
                            f"is {features}", f"pass --eval-features {ref.features}, or make the reference with "
                                              f"`dit fid --make-ref DATA --features {features} -o REF.npz`")
        if not load_extractor:
            return
        try:
            load_feature_extractor(features, torch.device("cpu"), self.weights)
        except UserError as exc:  # `dit fid`'s hint may name its --inception-weights, which `dit train` does not take
            raise UserError(exc.what, (exc.hint or "").split(", or pass --")[0] or None) from None

    def due(self, step: int) -> bool:
        """The decision comes from the step alone, so every rank takes it alike."""
        return self.every > 0 and step % self.every == 0

    def sampling(self, defaults: SamplingDefaults, guided: bool) -> SamplingDefaults:
        """The model's own sampling with what --eval-sampler, --eval-steps and --eval-cfg change; an unguided model
        (no null class) samples without guidance whatever --eval-cfg says."""
        cfg = defaults.cfg if self.cfg is None or not guided else self.cfg
        return replace(defaults, sampler=self.sampler or defaults.sampler, steps=self.steps or defaults.steps, cfg=cfg)


class Evaluator:
    """FD while training: whether an evaluation is due (`due`), running it (`__call__`), the reference's activations
    kept between evaluations, and the seconds spent, which the loop keeps out of its img/s."""

    def __init__(self, request: EvalRequest | None, out: Path):
        self.request, self.out = request, Path(out)
        self.reference: dict = {}  # the reference's activations, extracted once
        self.seconds = 0.0
        self.warned: set[str] = set()  # warnings already shown: each once a run

    @classmethod
    def from_config(cls, config, out: Path) -> Evaluator:
        """From a TrainConfig's --eval-* slice; an evaluator that is never due without --eval-every."""
        request = None if not config.eval_every else EvalRequest(
            config.eval_every, Path(config.eval_ref), config.eval_num, config.eval_features, config.eval_sampler,
            config.eval_steps, config.eval_cfg, config.dinov2_weights)
        return cls(request, out)

    def due(self, step: int) -> bool:
        return self.request is not None and self.request.due(step)

    def remaining(self, step: int, steps: int) -> int:
        """How many evaluations are still due after `step` up to `steps` (for the ETA)."""
        return 0 if self.request is None else steps // self.request.every - step // self.request.every

    def __call__(self, model, codec, config: GenerateConfig, ranks, device, step: int,
                 emit: Emit | None = None) -> dict | None:
        """Evaluate the EMA `model` at `step` into out/eval/step-<step>.npz; rank 0 gets the record, others None.

        `emit` hears `eval_start`, `eval_progress` (stage, done, total: this rank's sampling, then rank 0's feature
        extraction) and, on rank 0, each new warning of the scoring as `warning`.
        """
        emit = emit or (lambda kind, data: None)
        emit("eval_start", {"step": step, "num": config.num_images, "sampler": config.sampler, "steps": config.steps,
                            "cfg": config.guidance.scale, "features": self.request.features})
        started = time.perf_counter()
        path = self.out / "eval" / f"step-{step:07d}.npz"

        def progress(stage: str, done: int, total: int) -> None:
            emit("eval_progress", {"step": step, "stage": stage, "done": done, "total": total})

        record = evaluate_ema(model, codec, config, self.request, path, ranks, device, step, self.reference, progress)
        self.seconds += time.perf_counter() - started
        for warning in record.pop("warnings") if record is not None else ():
            if warning not in self.warned:
                self.warned.add(warning)
                emit("warning", {"message": f"warning: evaluation at step {step}: {warning}", "step": step})
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
                 step: int, reference: dict | None = None, progress: Progress | None = None) -> dict | None:
    """Sample `config` into `path` across the ranks, then score it on rank 0; rank 0 gets the record (with the
    scoring's `warnings`), others None.

    `reference` is the caller's cache of the reference's activations, kept between evaluations: a 60,000-image
    reference is read through the feature extractor once per run, not once per evaluation. `progress(stage, done,
    total)` hears the stages: sampling, then (rank 0) reference (once a run) and samples.
    """
    started = time.perf_counter()
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    writer = NpzWriter(path, ranks.rank)
    if ranks.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.prepare(config.run_key(f"ema-step-{step}", codec.to_dict()), force=True)
    ranks.barrier()
    counted = SamplingProgress(progress)
    sample_run(model, codec, config, device, [writer], ranks, provenance_of(config, model, codec, step),
               on_batch=counted.batch, on_plan=counted.plan)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    if ranks.rank != 0:
        return None
    set_backend_flags(allow_tf32=False, autotune=False)  # as `dit fid` scores
    try:
        fid_config = FidConfig(path, request.ref, features=request.features, precision_recall=False,
                               dinov2_weights=request.weights)
        cache = {} if reference is None else reference
        if "activations" not in cache:
            cache["activations"] = reference_activations(fid_config, device, progress)
        result = evaluate(fid_config, device, progress, ref_acts=cache["activations"])
    finally:
        set_backend_flags()  # back to training's TF32 and autotuning
    return {"step": step, "fd": result.fid, "kid": result.kid, "eval_num": result.num_samples,
            "eval_features": result.features, "eval_sampler": config.sampler, "eval_steps": config.steps,
            "eval_cfg": config.guidance.scale, "eval_seconds": round(time.perf_counter() - started, 3),
            "eval_npz": str(path), "warnings": list(result.warnings)}


def reference_activations(config: FidConfig, device, progress: Progress | None = None) -> Activations | None:
    """The reference's activations in `config.features` (as `dit fid`'s `reference_activations`), with progress:
    a 60,000-image reference takes minutes on a CPU. None when the reference holds statistics only."""
    ref = open_reference(config.ref, config.resize, config.num_workers)
    if ref.images is None:
        return None
    extractor, _ = load_feature_extractor(config.features, device, extractor_weights(config, config.features))
    total = ref.images.num_images

    def done(count: int) -> None:
        if progress is not None:
            progress("reference", count, total)

    return extract(ref.images.batches(config.batch_size), extractor, device, progress=done)


class SamplingProgress:
    """sample_run's `on_plan` and `on_batch` as progress("sampling", done, total) of this rank's images."""

    def __init__(self, progress: Progress | None):
        self.progress, self.done, self.total = progress, 0, 0

    def plan(self, total: int) -> None:
        self.total = total
        if self.progress is not None:
            self.progress("sampling", 0, total)

    def batch(self, batch) -> None:
        self.done += len(batch.indices)
        if self.progress is not None:
            self.progress("sampling", self.done, self.total)
