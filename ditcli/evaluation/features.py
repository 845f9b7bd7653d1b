"""Feature extractors and what is kept of their activations: the registry (`--features NAME|FILE`), the streamed
moments of pool features, Inception Score splits, and `extract`, which feeds batches through an extractor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditcli.errors import UserError
from ditcli.io import safetensors_metadata

Progress = Callable[[str, int, int], None]  # (stage, images done, images in total)
IS_SPLIT_SIZE = 5000  # ADM's Evaluator.compute_inception_score(split_size=5000)
MIN_IMAGES = 2  # the fewest images of a side: a covariance needs two
INCEPTION = "inception"
DINOV2 = "dinov2"  # FD-DINOv2 (EDM2): the class token of DINOv2 ViT-L/14 (ditcli.evaluation.dinov2)
Stats = tuple[torch.Tensor, torch.Tensor]  # (mu, sigma) in float64
FeatureFactory = Callable[[Path | None, torch.device], Callable]
_EXTRACTORS: dict[str, FeatureFactory] = {}


def register_feature_extractor(name: str, factory: FeatureFactory) -> None:
    """Make `--features NAME` (and .safetensors files whose metadata says `feature_extractor: NAME`) available.

    `factory(path, device)` returns a callable from uint8 images (N, 3, H, W) on `device` to a (N, D) tensor, or to a
    mapping with "pool" (N, D) and optionally "spatial" (N, D_s) for sFID and "logits" (N, C) for the Inception Score.
    `path` is the weight file to load (`--inception-weights`, `--dinov2-weights`, or the .safetensors file), or None for the default.
    """
    _EXTRACTORS[name] = factory


def is_known_extractor(spec: str) -> bool:
    """Whether `load_feature_extractor(spec)` can find it: a registered name or an existing file."""
    return spec in _EXTRACTORS or Path(spec).is_file()


def load_feature_extractor(spec: str, device: torch.device, weights: Path | None = None) -> tuple[Callable, str]:
    """(extractor, name) for a registered name, a TorchScript file (torch.jit.save) or a tagged .safetensors file."""
    if spec in _EXTRACTORS:
        return _EXTRACTORS[spec](weights, device), spec
    path = Path(spec)
    hint = f"use {', '.join(sorted(_EXTRACTORS))}, a TorchScript .pt file or a tagged .safetensors file"
    if not path.is_file():
        raise UserError(f"unknown feature extractor {spec!r}", hint)
    if path.suffix == ".safetensors":
        name = safetensors_metadata(path).get("feature_extractor")
        if name not in _EXTRACTORS:
            raise UserError(f"{path} names feature extractor {name!r}, which is not registered", hint)
        return _EXTRACTORS[name](path, device), path.name
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # TorchScript raises RuntimeError or ValueError for foreign files
        raise UserError(f"cannot load {path} as a TorchScript feature extractor: {str(exc).splitlines()[0]}",
                        hint) from None
    return module.eval(), path.name


def _feature_dict(output) -> dict[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return {"pool": output}
    if hasattr(output, "_asdict"):
        output = output._asdict()
    if not isinstance(output, Mapping) or "pool" not in output:
        raise UserError(f"the feature extractor returned {type(output).__name__}",
                        "return a (N, D) tensor or a dict with 'pool' and optionally 'spatial' and 'logits'")
    return {k: output[k].flatten(1) for k in ("pool", "spatial", "logits") if output.get(k) is not None}


class Moments:
    """Running mean and covariance in float64 by Chan et al.'s pairwise update: any batching gives the same result up
    to rounding."""

    def __init__(self):
        self.count, self.mean, self.scatter = 0, None, None

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        batch_mean = x.mean(dim=0)
        centered = x - batch_mean  # (B, D)
        if self.mean is None:
            self.mean = torch.zeros_like(batch_mean)
            self.scatter = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        delta = batch_mean - self.mean
        total = self.count + len(x)
        self.scatter.addmm_(centered.T, centered)  # in place: no (D, D) temporaries, 32 MB each for pool_3
        self.scatter.addr_(delta, delta, alpha=self.count * len(x) / total)
        self.mean += delta * (len(x) / total)
        self.count = total

    def stats(self) -> Stats:
        """(mu, sigma) with sigma normalised by N - 1, as np.cov."""
        if self.count < MIN_IMAGES:
            raise UserError(f"a covariance needs at least {MIN_IMAGES} images, got {self.count}", "pass more images")
        return self.mean.cpu(), (self.scatter / (self.count - 1)).cpu()


class ScoreSplits:
    """Sums behind the Inception Score over consecutive splits of `split_size` samples, filled batch by batch."""

    def __init__(self, split_size: int = IS_SPLIT_SIZE):
        self.split_size, self.count = split_size, 0
        self.sum_p: list[torch.Tensor] = []
        self.sum_p_log_p: list[float] = []
        self.sizes: list[int] = []

    def update(self, logits: torch.Tensor) -> None:
        log_p = torch.log_softmax(logits.double(), dim=1).cpu()
        p = log_p.exp()
        start = 0
        while start < len(p):
            take = min(len(p) - start, self.split_size - self.count % self.split_size)
            if self.count % self.split_size == 0:
                self.sum_p.append(torch.zeros(p.shape[1], dtype=torch.float64))
                self.sum_p_log_p.append(0.0)
                self.sizes.append(0)
            rows = slice(start, start + take)
            self.sum_p[-1] += p[rows].sum(dim=0)
            self.sum_p_log_p[-1] += float((p[rows] * log_p[rows]).sum())
            self.sizes[-1] += take
            self.count += take
            start += take

    def score(self) -> float:
        """Mean over splits of exp(E_x KL(p(y|x) || p(y))) (Salimans et al., 2016), as ADM."""
        scores = []
        for sum_p, sum_p_log_p, size in zip(self.sum_p, self.sum_p_log_p, self.sizes):
            marginal = sum_p / size
            kl = sum_p_log_p / size - float(torch.special.xlogy(marginal, marginal).sum())
            scores.append(math.exp(kl))
        return float(np.mean(scores))


@dataclass
class Activations:
    """What one pass over a set of images keeps: moments per feature, pool features for precision/recall, IS sums."""

    count: int
    pool: Moments
    spatial: Moments | None
    scores: ScoreSplits | None
    pool_features: torch.Tensor | None  # (N, D) float32
    constant_images: int
    nonfinite_rows: int


@torch.inference_mode()
def extract(batches: Iterable[np.ndarray], extractor: Callable, device: torch.device, keep_pool: bool = True,
            progress: Callable[[int], None] | None = None) -> Activations:
    """Run the extractor over uint8 (B, H, W, 3) batches and accumulate its features."""
    pool, spatial, scores = Moments(), Moments(), ScoreSplits()
    kept, count, constant, nonfinite = [], 0, 0, 0
    for batch in batches:
        images = torch.tensor(batch, device=device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        flat = images.flatten(1)
        constant += int((flat.amax(dim=1) == flat.amin(dim=1)).sum())
        features = _feature_dict(extractor(images))
        nonfinite += int((~torch.isfinite(features["pool"]).all(dim=1)).sum())
        pool.update(features["pool"])
        if "spatial" in features:
            spatial.update(features["spatial"])
        if "logits" in features:
            scores.update(features["logits"])
        if keep_pool:
            kept.append(features["pool"].float())
        count += len(batch)
        if progress is not None:
            progress(count)
    return Activations(count, pool, spatial if spatial.count else None, scores if scores.count else None,
                       torch.cat(kept) if kept else None, constant, nonfinite)


def _stage(progress: Progress | None, stage: str, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    progress(stage, 0, total)
    return lambda done: progress(stage, done, total)


def _rank_deficient(acts: Activations) -> bool:
    """N images give a covariance of rank at most N - 1, so it needs more images than features to be full rank."""
    return acts.count <= acts.pool.mean.numel()
