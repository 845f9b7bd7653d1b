"""`GenerateConfig`: everything that decides the pixels of a sampling run, the sampler plan it implies, and the
run key that lets a rerun resume only the same run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from ditcli.diffusion.guidance import (
    Guidance,
)
from ditcli.diffusion.objectives import DDPM, Objective
from ditcli.diffusion.samplers import MAX_STEPS, FlowSettings, SamplerPlan
from ditcli.errors import UserValueError
from ditcli.sampling.block_cache import check_threshold

ADDED_FIELDS = ("objective", "flow", "cache")
LABEL_STREAM = 0x1ABE1  # keeps the label draws apart from the noise draws of the same (seed, index)


@dataclass(frozen=True)
class GenerateConfig:
    """Everything that decides the pixels of a run, plus the batch size and compile flag, which must not."""

    labels: tuple[int, ...]
    seed: int = 0
    sampler: str = "ddpm"
    steps: int = 250
    eta: float = 0.0
    guidance: Guidance = Guidance()
    batch_size: int = 16
    precision: str = "fp32"
    compile: bool = False
    schedule: str = "linear"  # the checkpoint's training betas
    objective: Objective = DDPM  # the checkpoint's objective (and a flow's time direction)
    flow: FlowSettings = FlowSettings()  # a flow sampler's time shift, tolerances and last step
    cache: float | None = None  # `BlockCache`'s threshold; None runs every block without it

    def __post_init__(self):
        if not self.labels:
            raise UserValueError("nothing to sample: the run has 0 images",
                                 "use --num N or --num-per-class N with N >= 1")
        if self.batch_size < 1:
            raise UserValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not 1 <= self.steps <= MAX_STEPS:  # whether from --steps or from a file's defaults: never a 10M-step run
            raise UserValueError(f"steps must be between 1 and {MAX_STEPS:,}, got {self.steps:,}",
                                 f"sample with --steps {min(max(self.steps, 1), MAX_STEPS)}")
        if self.seed < 0:
            raise UserValueError(f"seed must be >= 0, got {self.seed}")
        check_threshold(self.cache)
        if self.cache is not None and self.compile:
            raise UserValueError("--cache runs the blocks one at a time, eagerly: drop --compile")

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def plan(self, learn_sigma: bool) -> SamplerPlan:
        """The sampler on the checkpoint's own process: its betas, or its flow's time direction."""
        return self.objective.plan(self.sampler, self.steps, learn_sigma, schedule=self.schedule, eta=self.eta,
                                   flow=self.flow)

    def run_key(self, checkpoint_sha256: str, codec: dict) -> str:
        """A digest of what decides the pixels; a re-run resumes only a run with the same key."""
        fields = asdict(self)
        fields.pop("batch_size"), fields.pop("compile")
        fields["objective"] = self.objective.to_metadata()  # the record, as files keep it
        unset = {"cache": not self.cache}  # threshold 0 gives the uncached pixels
        for name in ADDED_FIELDS:  # hashed only where set, so runs from before them keep their keys
            if unset.get(name, getattr(self, name) == GenerateConfig.__dataclass_fields__[name].default):
                fields.pop(name)
        fields["labels"] = hashlib.sha256(np.asarray(self.labels, dtype=np.int64).tobytes()).hexdigest()
        fields.update(checkpoint=checkpoint_sha256, codec=codec)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
