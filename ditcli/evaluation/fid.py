"""FID, sFID, Inception Score, precision and recall as ADM's evaluator computes them, in PyTorch.

The reference semantics are guided-diffusion's `evaluations/evaluator.py`, the script behind DiT's published table:

- FID on pool_3 and sFID on the first 7 channels of mixed_6/conv, each from the mean and covariance in float64;
- the Inception Score from the softmax of pool_3 @ W, over consecutive splits of 5000 samples;
- precision and recall (Kynkaanniemi et al., 2019) from k = 3 nearest-neighbour balls on pool_3, with distances
  rounded to float16 as ADM's TensorFlow code does.

Images stream from an ADM `.npz` (`arr_0`, uint8 (N, H, W, 3)) or a folder, a batch at a time; only features and
running moments stay in memory. Problems worth a note come back in `FidResult.warnings`, never printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ditcli.errors import UserError
from ditcli.evaluation.dinov2 import dinov2_extractor
from ditcli.evaluation.features import (
    DINOV2,
    INCEPTION,
    Activations,
    Progress,
    Stats,
    _rank_deficient,
    _stage,
    extract,
    is_known_extractor,
    load_feature_extractor,
    register_feature_extractor,
)
from ditcli.evaluation.inception import load_inception
from ditcli.evaluation.judge import JUDGE_NAME, judge_extractor
from ditcli.evaluation.protocol import check_samples
from ditcli.evaluation.readers import FolderImages, open_images
from ditcli.evaluation.references import Reference, _json_field, open_reference
from ditcli.evaluation.scores import (
    KID_SUBSETS,
    NEAREST_K,
    distance_blocks,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)

register_feature_extractor(INCEPTION, lambda path, device: load_inception(path, device))
register_feature_extractor(JUDGE_NAME, judge_extractor)  # the Fashion-MNIST judge: pool (128) and logits (10)
register_feature_extractor(DINOV2, dinov2_extractor)  # FD-DINOv2: the class token of EDM2's preprocessed input


# Scoring.

@dataclass(frozen=True)
class FidConfig:
    """What `dit fid SAMPLES --ref REF` computes."""

    samples: Path
    ref: Path
    batch_size: int = 64
    features: str | None = None  # None: the extractor the reference records (`references.Reference.features`)
    inception_weights: Path | None = None
    resize: int | None = None
    num_workers: int = 4
    precision_recall: bool = True  # off for FID while training and with --no-pr: the k-NN radii of a large reference
    # cost minutes
    dinov2_weights: str | None = None  # --dinov2-weights PATH|URL; None: the released ViT-L/14, downloaded once


@dataclass(frozen=True)
class FidResult:
    fid: float
    sfid: float | None
    inception_score: float | None
    precision: float | None
    recall: float | None
    num_samples: int
    num_ref: int | None  # reference images read; None when only stored statistics were used
    ref_stats: str  # which reference statistics FID and sFID used
    features: str
    warnings: tuple[str, ...] = ()
    protocol: dict | None = None  # how the samples were drawn, from their `dit sample` provenance (ditcli.evaluation.protocol)
    kid: float | None = None  # unbiased KID of the pool features; None when only stored reference statistics exist
    kid_std: float | None = None  # its standard deviation over the KID_SUBSETS subsets

    def to_dict(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings)}


def evaluate(config: FidConfig, device: torch.device, progress: Progress | None = None,
             ref_acts: Activations | None = None) -> FidResult:
    """Score samples against a reference with ADM's metrics; inputs are checked before any network loads.

    `ref_acts`: the reference's activations from an earlier call with the same reference and features (training
    evaluates against one reference many times), instead of extracting them again. `progress(stage, done, total)`
    hears every stage that can take seconds: "reference" and "samples" (images), "Frechet distance" (scores),
    "precision/recall" (distance blocks) and "KID" (subsets).
    """
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {config.batch_size}")
    samples = open_images(config.samples, config.resize, config.num_workers)
    ref = open_reference(config.ref, config.resize, config.num_workers)
    name = features_for(config, ref)
    extractor, features = load_feature_extractor(name, device, extractor_weights(config, name))
    use_stored = ref.pool is not None and ref.features == features
    if ref.images is None and not use_stored:
        raise UserError(f"{ref.path} has statistics from {ref.features!r} but no images to recompute them",
                        f"score with --features {ref.features}, or give a reference with arr_0")

    # Extract reference then sample features, as ADM does.
    if ref_acts is None and ref.images is not None:
        ref_acts = extract(ref.images.batches(config.batch_size), extractor, device,
                           progress=_stage(progress, "reference", ref.images.num_images))
    sample_acts = extract(samples.batches(config.batch_size), extractor, device,
                          progress=_stage(progress, "samples", samples.num_images))

    # Score: the Frechet distances from stored or computed reference statistics, then the k-NN and kernel scores.
    ref_pool, ref_spatial, ref_stats = reference_stats(ref, ref_acts, use_stored)
    fid, sfid = frechet_scores(sample_acts, ref_pool, ref_spatial, progress)
    precision, recall = nearest_neighbour_scores(config, ref_acts, sample_acts, progress)
    kid, kid_std = kernel_scores(ref_acts, sample_acts, progress)
    height, width = samples.resolution
    protocol, off_protocol = check_samples(config.samples, config.ref, sample_acts.count,
                                           height if height == width else None)
    return FidResult(fid, sfid, sample_acts.scores.score() if sample_acts.scores else None, precision, recall,
                     sample_acts.count, ref_acts.count if ref_acts else None, ref_stats, features,
                     (*_warnings(samples, ref, sample_acts, ref_acts, use_stored), *off_protocol), protocol, kid,
                     kid_std)


def features_for(config: FidConfig, ref: Reference) -> str:
    """--features as given, else the extractor the reference's statistics were made with (`--make-ref` records it;
    ADM's batches, which record none, are Inception's)."""
    features = config.features or ref.features
    if config.features is None and not is_known_extractor(features):
        raise UserError(f"{ref.path.name} was made with the feature extractor {features!r}, which is neither "
                        "registered nor a file here", "pass --features with that extractor (its file)")
    if config.inception_weights is not None and features != INCEPTION:
        why = "" if config.features else f" (the reference's, {ref.path.name}, since --features is not given)"
        raise UserError(f"--inception-weights only applies to --features inception, and the features are "
                        f"{features}{why}", "drop --inception-weights, or pass --features inception")
    if config.dinov2_weights is not None and features != DINOV2:
        raise UserError(f"--dinov2-weights only applies to --features dinov2, and the features are {features}",
                        "drop --dinov2-weights, or pass --features dinov2")
    if features == DINOV2 and ref.features != DINOV2:
        raise UserError(f"{ref.path.name} was made with {ref.features!r} features, not dinov2",
                        "make one with `dit fid --make-ref DATA --features dinov2 -o REF.npz`")
    return features


def extractor_weights(config: FidConfig, features: str | None) -> Path | str | None:
    """The weight option that belongs to the extractor: --dinov2-weights for dinov2, else --inception-weights."""
    return config.dinov2_weights if features == DINOV2 else config.inception_weights


def reference_stats(ref: Reference, ref_acts: Activations | None, use_stored: bool
                    ) -> tuple[Stats, Stats | None, str]:
    """The reference's pool and spatial statistics, stored ones when they come from this extractor, else computed;
    and which, in words."""
    if use_stored:
        return ref.pool, ref.spatial, f"stored mu/sigma{'/mu_s/sigma_s' if ref.spatial else ''} of {ref.path.name}"
    spatial = ref_acts.spatial.stats() if ref_acts.spatial else None
    return ref_acts.pool.stats(), spatial, f"computed from the {ref_acts.count} reference images"


def frechet_scores(sample_acts: Activations, ref_pool: Stats, ref_spatial: Stats | None,
                   progress: Progress | None) -> tuple[float, float | None]:
    """FID, and sFID where both sides have spatial features; each is two eigendecompositions in float64 (seconds for
    Inception's 2048 features on a CPU)."""
    pairs = [(sample_acts.pool, ref_pool)]
    if sample_acts.spatial is not None and ref_spatial is not None:
        pairs.append((sample_acts.spatial, ref_spatial))
    tick = _stage(progress, "Frechet distance", len(pairs))
    scores = []
    for moments, ref_stats in pairs:
        scores.append(frechet_distance(*moments.stats(), *ref_stats))
        if tick is not None:
            tick(len(scores))
    return scores[0], scores[1] if len(scores) > 1 else None


def nearest_neighbour_scores(config: FidConfig, ref_acts: Activations | None, sample_acts: Activations,
                             progress: Progress | None) -> tuple[float | None, float | None]:
    """Precision and recall, unless `config.precision_recall` is off or a side has too few images (a warning)."""
    if not config.precision_recall or ref_acts is None or min(ref_acts.count, sample_acts.count) <= NEAREST_K:
        return None, None
    tick = _stage(progress, "precision/recall", distance_blocks(ref_acts.count, sample_acts.count))
    return precision_recall(ref_acts.pool_features, sample_acts.pool_features,
                            progress=None if tick is None else lambda done, total: tick(done))


def kernel_scores(ref_acts: Activations | None, sample_acts: Activations,
                  progress: Progress | None) -> tuple[float | None, float | None]:
    """KID and its spread over subsets, where the reference's images were read."""
    if ref_acts is None or min(ref_acts.count, sample_acts.count) < 2:
        return None, None
    tick = _stage(progress, "KID", KID_SUBSETS)
    return kernel_inception_distance(sample_acts.pool_features, ref_acts.pool_features,
                                     progress=None if tick is None else lambda done, total: tick(done))


def reference_activations(config: FidConfig, device: torch.device) -> Activations | None:
    """The reference's activations in `config.features`, for later `evaluate(..., ref_acts=)` calls; None when the
    reference holds statistics only."""
    ref = open_reference(config.ref, config.resize, config.num_workers)
    if ref.images is None:
        return None
    extractor, _ = load_feature_extractor(config.features, device, extractor_weights(config, config.features))
    return extract(ref.images.batches(config.batch_size), extractor, device)


def _warnings(samples, ref: Reference, sample_acts: Activations, ref_acts: Activations | None,
              use_stored: bool) -> Iterator[str]:
    if _rank_deficient(sample_acts):
        yield (f"only {sample_acts.count} samples for {sample_acts.pool.mean.numel()} features: the covariance is "
               f"rank-deficient, so FID is biased upward and not comparable with 50,000-sample figures")
    if ref_acts is not None and not use_stored and _rank_deficient(ref_acts):
        yield (f"only {ref_acts.count} reference images for {ref_acts.pool.mean.numel()} features: the reference "
               f"covariance is rank-deficient")
    if ref.images is not None and samples.resolution != ref.images.resolution:
        (sh, sw), (rh, rw) = samples.resolution, ref.images.resolution
        yield (f"samples are {sw}x{sh} but the reference is {rw}x{rh}: scores are not comparable with published "
               f"figures at the reference resolution")
    for name, acts in (("sample", sample_acts), ("reference", ref_acts)):
        if acts is not None and acts.constant_images:
            yield (f"{acts.constant_images} of {acts.count} {name} images are a single flat colour (NaN latents and "
                   f"diverged sampling decode to these)")
        if acts is not None and acts.nonfinite_rows:
            yield f"{acts.nonfinite_rows} {name} images gave NaN or infinite features"
    provenance = samples.path / "provenance.json" if isinstance(samples, FolderImages) else None
    if provenance is not None and provenance.is_file() and not _json_field(provenance, "complete", True):
        yield f"{provenance} says the `dit sample` run has not finished: some images are missing"
    if ref.images is None:
        yield f"{ref.path.name} has no arr_0, so precision, recall and KID were skipped"
    elif min(sample_acts.count, ref_acts.count) <= NEAREST_K:
        yield f"precision and recall need more than {NEAREST_K} images on each side and were skipped"


# Building references.


MAX_RESIZE = 4096  # the largest --resize `dit fid` takes


def check_fid_mode(samples: Path | None, ref: Path | None, make_ref: str | None, output: Path | None,
                split: str | None) -> None:
    """Either score SAMPLES against --ref, or build a reference with --make-ref DATA -o PATH."""
    if make_ref is not None:
        if samples is not None or ref is not None:
            raise UserError("--make-ref builds a reference; it takes no SAMPLES or --ref",
                            "run `dit fid --make-ref FOLDER -o ref.npz`, then score against ref.npz")
        if output is None:
            raise UserError("--make-ref needs -o PATH for the reference .npz")
    elif split is not None:
        raise UserError("--split only applies to --make-ref", "drop --split")
    elif samples is None or ref is None:
        raise UserError("nothing to score" if samples is None else "--ref is required",
                        "run `dit fid SAMPLES --ref REF.npz`, or `dit fid --make-ref FOLDER -o ref.npz`")


def check_options(batch_size: int, num_workers: int, resize: int | None) -> None:
    """The numeric options, each named, before any image or network is read."""
    for flag, value, low, high in (("--batch-size", batch_size, 1, 1 << 16), ("--num-workers", num_workers, 0, 256),
                                   ("--resize", resize, 1, MAX_RESIZE)):
        if value is not None and not low <= value <= high:
            raise UserError(f"{flag} must be between {low:,} and {high:,}, got {value:,}",
                            f"pass {flag} {min(max(value, low), high)}")
