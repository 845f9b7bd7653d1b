"""The exponential moving average of the weights: its per-step decay, and how much of its start it still holds.

EMA_t = d_t EMA_{t-1} + (1 - d_t) theta_t starts from the initial weights, which keep the weight prod_t d_t. With
DiT's decay 0.9999 and no warm-up that is still 0.61 after 5,000 updates: the EMA of a short run is mostly its
initialisation and samples noise. `EmaRecord` travels in checkpoints so sampling can say so. A fine-tune's EMA starts
from its source's weights instead (`from_source`): the share it still gives its start is the source's, not noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

STALE_SHARE = 0.1  # warn when the starting weights still hold more than this share of the EMA


def ema_decay_at(decay: float, warmup: bool, step: int) -> float:
    """The decay of update `step` (0-based): `decay`, or with warm-up min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def start_share(decay: float, warmup: bool, updates: int) -> float:
    """prod_{n < updates} d_n: the weight the EMA still gives its starting value after `updates` updates.

    The warm-up factors (1 + n) / (10 + n) apply while they are below `decay`, for n < m; their product is
    9! m! / (m + 9)!, taken through log-gamma.
    """
    if updates <= 0:
        return 1.0
    if decay <= 0:
        return 0.0
    warm = min(updates, max(0, math.ceil((10 * decay - 1) / (1 - decay)))) if warmup else 0
    log_share = math.lgamma(10) + math.lgamma(warm + 1) - math.lgamma(warm + 10)
    return math.exp(log_share + (updates - warm) * math.log(decay))


@dataclass(frozen=True)
class EmaRecord:
    """How a checkpoint's EMA was made: its decay, whether it warmed up, and the optimizer steps it followed."""

    decay: float
    warmup: bool
    steps: int
    from_source: bool = False  # started as a copy of `--init-from`'s weights, not of a fresh initialisation

    @property
    def start_share(self) -> float:
        return start_share(self.decay, self.warmup, self.steps)

    @property
    def mostly_initial(self) -> bool:
        """Whether the EMA is still mostly a fresh initialisation (never, when it started from a source's weights)."""
        return not self.from_source and self.start_share > STALE_SHARE

    def history(self) -> str:
        """"followed only 150 steps at decay 0.9999 (without warm-up), so 99% of them are still the initial weights"."""
        warm = "with" if self.warmup else "without"
        start = "the --init-from source's weights" if self.from_source else "the initial weights"
        return (f"followed only {self.steps:,} steps at decay {self.decay:g} ({warm} warm-up), so "
                f"{self.start_share:.0%} of them are still {start}")

    def staleness(self) -> str | None:
        """A warning when the EMA is still mostly its starting weights; None when it has moved on."""
        if self.start_share <= STALE_SHARE:
            return None
        if self.from_source:
            return (f"the EMA weights have {self.history()}: samples show the source model more than "
                    f"this fine-tune, which is fine for a short one; sample --weights model for the fine-tuned "
                    f"weights, or train longer")
        return (f"the EMA weights have {self.history()} and samples will look like noise; sample --weights model, "
                f"train longer, or train with --ema-warmup")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> EmaRecord | None:
        if not data:
            return None
        return cls(float(data["decay"]), bool(data["warmup"]), int(data["steps"]), bool(data.get("from_source")))
