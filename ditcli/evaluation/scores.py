"""The scores, as ADM's evaluator computes them: Frechet distance, KID (polynomial-kernel MMD over subsets),
and the k-NN manifold precision and recall with ADM's float16 distance blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ditcli.errors import UserError

KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al.'s estimate as torch-fidelity and clean-fid default it
NEAREST_K = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
PR_BLOCK = 10000  # ADM's row and column batch; its float16 overflow fallback is decided per block
Ticks = Callable[[int, int], None] | None  # progress(done, total) of a score's units of work


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians (Dowson & Landau, 1982).

    With S1 = U diag(l) U^T and W = U diag(sqrt(l)), tr (S1 S2)^(1/2) is the sum of square roots of the eigenvalues of
    the symmetric positive semi-definite W^T S2 W, so two float64 eigh calls replace ADM's complex sqrtm and its eps
    retry; they agree wherever sqrtm converges. Directions with l below S1's numerical-rank tolerance (d * eps *
    max l, as numpy's matrix_rank) hold only rounding noise and are dropped.
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a).double() for a in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"the statistics have different sizes ({mu1.numel()} vs {mu2.numel()} features)",
                        "score samples and reference with the same feature extractor")
    if not all(torch.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        return math.nan  # non-finite features, reported as a warning
    eigenvalues, eigenvectors = torch.linalg.eigh((sigma1 + sigma1.T) / 2)
    keep = eigenvalues > len(eigenvalues) * torch.finfo(torch.float64).eps * eigenvalues.abs().max()
    w = eigenvectors[:, keep] * eigenvalues[keep].sqrt()  # (D, rank)
    inner = w.T @ sigma2 @ w  # (rank, rank)
    root_eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * root_eigenvalues.sum())


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 of Binkowski et al. (2018), Eq. 3, with the kernel k(a, b) = (a.b / d + 1)^3."""
    d, m, n = x.shape[1], len(x), len(y)
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))  # (m, m), (n, n), (m, n)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(samples: torch.Tensor, ref: torch.Tensor, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0,
                              progress: Ticks = None) -> tuple[float, float]:
    """KID (Binkowski et al., 2018): the mean and standard deviation of the unbiased MMD^2 over `subsets` random
    subsets of min(subset_size, N) features drawn without replacement from each side, float64, a fixed seed.
    `progress(done, subsets)` hears each subset (on Inception's 2048 features, 100 subsets take tens of seconds on
    a CPU)."""
    size = min(subset_size, len(samples), len(ref))
    if size < 2:
        raise UserError(f"KID needs at least 2 images on each side, got {min(len(samples), len(ref))}",
                        "pass more images")
    generator = torch.Generator().manual_seed(seed)
    x, y = samples.double().cpu(), ref.double().cpu()
    values = []
    for done in range(1, subsets + 1):
        values.append(polynomial_mmd2(x[torch.randperm(len(x), generator=generator)[:size]],
                                      y[torch.randperm(len(y), generator=generator)[:size]]))
        if progress is not None:
            progress(done, subsets)
    values = torch.tensor(values)
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0


def _to_half(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def adm_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared distances max(|u|^2 - 2 u.v + |v|^2, 0) between rows, as ADM's DistanceBlock: inputs and every step
    rounded to float16 (so radius ties break as in ADM), in float32 only if float16 overflows anywhere."""
    u16, v16 = _to_half(u), _to_half(v)
    norm_u = _to_half(_to_half(u16.square()).sum(dim=1, keepdim=True))  # (M, 1)
    norm_v = _to_half(_to_half(v16.square()).sum(dim=1))[None]  # (1, N)
    distances = _to_half(_to_half(norm_u - _to_half(2 * (u16 @ v16.T))) + norm_v).clamp_min(0)
    if torch.isfinite(distances).all():
        return distances
    u, v = u.float(), v.float()
    return (u.square().sum(1, keepdim=True) - 2 * (u @ v.T) + v.square().sum(1)[None]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = NEAREST_K, tick: Callable[[], None] | None = None) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest neighbour in the set, itself counted as the 0-th; `tick()`
    after each block of distances."""
    radii = []
    for rows in features.split(PR_BLOCK):
        candidates = []
        for cols in features.split(PR_BLOCK):
            candidates.append(adm_sq_distances(rows, cols).topk(k + 1, dim=1, largest=False).values)
            if tick is not None:
                tick()
        radii.append(torch.cat(candidates, dim=1).topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def distance_blocks(num_ref: int, num_samples: int) -> int:
    """The PR_BLOCK x PR_BLOCK distance blocks `precision_recall` computes: both sets' radii, then ref x samples."""
    ref_blocks, sample_blocks = -(-num_ref // PR_BLOCK), -(-num_samples // PR_BLOCK)
    return ref_blocks ** 2 + sample_blocks ** 2 + ref_blocks * sample_blocks


def precision_recall(ref: torch.Tensor, samples: torch.Tensor, k: int = NEAREST_K,
                     progress: Ticks = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) as ADM's ManifoldEstimator.evaluate_pr: precision is
    the share of samples inside some reference ball, recall the share of references inside some sample ball.
    `progress(done, total)` hears each block of distances (`distance_blocks`; a 60,000-image reference takes minutes
    on a CPU)."""
    total, done = distance_blocks(len(ref), len(samples)), [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    ref_radii, sample_radii = manifold_radii(ref, k, tick), manifold_radii(samples, k, tick)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_covered = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    for i, ref_rows in enumerate(ref.split(PR_BLOCK)):
        ref_slice = slice(i * PR_BLOCK, i * PR_BLOCK + len(ref_rows))
        for j, sample_rows in enumerate(samples.split(PR_BLOCK)):
            sample_slice = slice(j * PR_BLOCK, j * PR_BLOCK + len(sample_rows))
            distances = adm_sq_distances(ref_rows, sample_rows)  # (R, S)
            ref_covered[ref_slice] |= (distances <= sample_radii[sample_slice][None]).any(dim=1)
            sample_covered[sample_slice] |= (distances <= ref_radii[ref_slice][:, None]).any(dim=0)
            tick()
    return float(sample_covered.double().mean()), float(ref_covered.double().mean())
