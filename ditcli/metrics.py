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

import json
import math
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditcli.data import center_crop_arr, is_idx_source, load_images
from ditcli.errors import UserError
from ditcli.images import IMAGE_SUFFIXES, image_files
from ditcli.inception import load_inception
from ditcli.io import replacing, safetensors_metadata
from ditcli.judge import JUDGE_NAME, judge_extractor
from ditcli.protocol import check_samples

IS_SPLIT_SIZE = 5000  # ADM's Evaluator.compute_inception_score(split_size=5000)
NEAREST_K = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
PR_BLOCK = 10000  # ADM's row and column batch; its float16 overflow fallback is decided per block
FOLDER_REF_SIZE = 256  # ADM's ImageNet 256 reference batches; `--resize` picks another
SKIPPED_FILES = ("grid.png",)  # the contact sheet `dit sample` writes next to its images
INCEPTION = "inception"
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al.'s estimate as torch-fidelity and clean-fid default it

Progress = Callable[[str, int, int], None]  # (stage, images done, images in total)
Stats = tuple[torch.Tensor, torch.Tensor]  # (mu, sigma) in float64


# Images.

def as_rgb(batch: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, C) with C = 1 or 3 as (B, H, W, 3): grayscale is copied to every channel, as PIL's RGB
    conversion of a gray PNG does, so an .npz and the PNGs of one `dit sample` run score the same."""
    return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch


class NpzImages:
    """`arr_0` of an ADM sample or reference batch, uint8 (N, H, W, 3), read a batch at a time from the zip.

    Grayscale arrays, (N, H, W, 1) as `dit sample --npz` writes for 1-channel models or (N, H, W), are read too and
    come out as 3 equal channels.
    """

    def __init__(self, path: Path):
        self.path = path
        with self._open() as f:
            shape, dtype = _read_npy_header(f, path)
        if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
            raise UserError(f"{path}: arr_0 is {dtype} with shape {shape}, expected uint8 (N, H, W, 3), "
                            "(N, H, W, 1) or (N, H, W)",
                            "save samples as ADM does: np.savez(path, arr_0=uint8 images in NHWC order)")
        if shape[0] == 0:
            raise UserError(f"{path}: arr_0 holds no images", "pass a batch with at least 2 images")
        self.num_images, self.resolution = shape[0], (shape[1], shape[2])
        self.channels = shape[3] if len(shape) == 4 else 1

    def _open(self):
        try:
            archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"cannot read {self.path} as an .npz: {exc}", "pass an ADM .npz written by np.savez")
        if "arr_0.npy" not in archive.namelist():
            keys = ", ".join(n.removesuffix(".npy") for n in archive.namelist()) or "nothing"
            raise UserError(f"{self.path} has no arr_0 (it holds {keys})",
                            "ADM sample batches store the images as arr_0: uint8 (N, H, W, 3)")
        return archive.open("arr_0.npy")

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        height, width = self.resolution
        image_bytes = height * width * self.channels
        with self._open() as f:
            _read_npy_header(f, self.path)
            for start in range(0, self.num_images, batch_size):
                count = min(batch_size, self.num_images - start)
                data = f.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise UserError(f"{self.path}: arr_0 ends after {start + len(data) // image_bytes} images",
                                    "the file is truncated; write it again")
                batch = np.frombuffer(data, dtype=np.uint8).reshape(count, height, width, self.channels)
                yield as_rgb(batch)  # (B, H, W, 3)


class ArrayImages:
    """Images already in memory, uint8 (N, H, W, C) from a `dit train --data` source, as (B, H, W, 3) batches.

    With `resize`, each image goes through ADM's center crop to resize x resize, as folder images do.
    """

    def __init__(self, images: np.ndarray, source: str, resize: int | None = None):
        if resize is not None and images.shape[1:3] != (resize, resize):
            images = np.stack([_crop(image, resize) for image in images])
        self.images, self.path = images, Path(source)
        self.num_images, self.resolution = len(images), tuple(images.shape[1:3])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.num_images, batch_size):
            yield as_rgb(self.images[start:start + batch_size])  # (B, H, W, 3)


def _crop(image: np.ndarray, size: int) -> np.ndarray:
    gray = image.shape[-1] == 1
    array = center_crop_arr(Image.fromarray(image[..., 0] if gray else image), size)
    return array[..., None] if gray else array


def _read_npy_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
    except ValueError as exc:
        raise UserError(f"{path}: arr_0 is not a valid .npy array ({exc})", "write it with np.savez") from None
    if fortran_order:
        raise UserError(f"{path}: arr_0 is in Fortran order", "save np.ascontiguousarray(images)")
    return shape, dtype


class FolderImages:
    """Every image under a folder (recursively, sorted by path), decoded to RGB by a pool of threads.

    `dit sample` output directories are such folders; their `grid.png` is skipped. With `resize`, each image goes
    through ADM's center crop to resize x resize; without it all images must share one size.
    """

    def __init__(self, path: Path, resize: int | None = None, num_workers: int = 4):
        self.path, self.resize, self.num_workers = path, resize, max(1, num_workers)
        self.files = image_files(path, skip=SKIPPED_FILES)
        if not self.files:
            raise UserError(f"no images in {path}", f"expected {', '.join(IMAGE_SUFFIXES)} files")
        self.num_images = len(self.files)
        self.resolution = (resize, resize) if resize else self._common_size()

    def _common_size(self) -> tuple[int, int]:
        with ThreadPoolExecutor(self.num_workers) as pool:
            sizes = list(pool.map(_image_size, self.files))
        first = sizes[0]
        for file, size in zip(self.files, sizes):
            if size != first:
                raise UserError(f"mixed image sizes: {self.files[0].name} is {first[1]}x{first[0]} but {file.name} "
                                f"is {size[1]}x{size[0]}", "pass --resize N to center-crop every image to N x N")
        return first

    def _load(self, file: Path) -> np.ndarray:
        try:
            with Image.open(file) as image:
                image = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UserError(f"cannot decode image {file}: {exc}", "remove, shrink or replace the file") from None
        array = center_crop_arr(image, self.resize) if self.resize else np.asarray(image)
        if array.shape[:2] != self.resolution:
            raise UserError(f"{file} decodes to {array.shape[1]}x{array.shape[0]}, not "
                            f"{self.resolution[1]}x{self.resolution[0]}", "pass --resize N")
        return array

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches in path order; two batches decode ahead so memory stays bounded."""
        with ThreadPoolExecutor(self.num_workers) as pool:
            pending = deque()
            for start in range(0, self.num_images, batch_size):
                pending.append([pool.submit(self._load, f) for f in self.files[start:start + batch_size]])
                if len(pending) > 2:
                    yield np.stack([job.result() for job in pending.popleft()])
            while pending:
                yield np.stack([job.result() for job in pending.popleft()])


def _image_size(file: Path) -> tuple[int, int]:
    """(height, width) from the header alone."""
    try:
        with Image.open(file) as image:
            return image.size[1], image.size[0]
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"cannot read image {file}: {exc}", "remove, shrink or replace the file") from None


def open_images(path: Path, resize: int | None = None, num_workers: int = 4, role: str = "samples"):
    """Samples or reference images: an ADM .npz (arr_0) or a folder of images."""
    if not path.exists():
        raise UserError(f"{role} not found: {path}", "pass an ADM .npz with arr_0 or a folder of images")
    if path.is_dir():
        return FolderImages(path, resize, num_workers)
    if path.suffix.lower() == ".npz":
        return NpzImages(path)
    raise UserError(f"cannot read {role} from {path}", "pass an ADM .npz with arr_0 or a folder of images")


# Feature extractors.

FeatureFactory = Callable[[Path | None, torch.device], Callable]
_EXTRACTORS: dict[str, FeatureFactory] = {}


def register_feature_extractor(name: str, factory: FeatureFactory) -> None:
    """Make `--features NAME` (and .safetensors files whose metadata says `feature_extractor: NAME`) available.

    `factory(path, device)` returns a callable from uint8 images (N, 3, H, W) on `device` to a (N, D) tensor, or to a
    mapping with "pool" (N, D) and optionally "spatial" (N, D_s) for sFID and "logits" (N, C) for the Inception Score.
    `path` is the weight file to load (`--inception-weights`, or the .safetensors file), or None for the default.
    """
    _EXTRACTORS[name] = factory


register_feature_extractor(INCEPTION, lambda path, device: load_inception(path, device))
register_feature_extractor(JUDGE_NAME, judge_extractor)  # the Fashion-MNIST judge: pool (128) and logits (10)


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


# Streaming statistics.

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
        if self.count < 2:
            raise UserError(f"a covariance needs at least 2 images, got {self.count}", "pass more images")
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


# Metrics.

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
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al., 2018): the mean and standard deviation of the unbiased MMD^2 over `subsets` random
    subsets of min(subset_size, N) features drawn without replacement from each side, float64, a fixed seed."""
    size = min(subset_size, len(samples), len(ref))
    if size < 2:
        raise UserError(f"KID needs at least 2 images on each side, got {min(len(samples), len(ref))}",
                        "pass more images")
    generator = torch.Generator().manual_seed(seed)
    x, y = samples.double().cpu(), ref.double().cpu()
    values = torch.tensor([polynomial_mmd2(x[torch.randperm(len(x), generator=generator)[:size]],
                                           y[torch.randperm(len(y), generator=generator)[:size]])
                           for _ in range(subsets)])
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


def manifold_radii(features: torch.Tensor, k: int = NEAREST_K) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest neighbour in the set, itself counted as the 0-th."""
    radii = []
    for rows in features.split(PR_BLOCK):
        candidates = [adm_sq_distances(rows, cols).topk(k + 1, dim=1, largest=False).values
                      for cols in features.split(PR_BLOCK)]
        radii.append(torch.cat(candidates, dim=1).topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def precision_recall(ref: torch.Tensor, samples: torch.Tensor, k: int = NEAREST_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) as ADM's ManifoldEstimator.evaluate_pr: precision is
    the share of samples inside some reference ball, recall the share of references inside some sample ball."""
    ref_radii, sample_radii = manifold_radii(ref, k), manifold_radii(samples, k)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_covered = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    for i, ref_rows in enumerate(ref.split(PR_BLOCK)):
        ref_slice = slice(i * PR_BLOCK, i * PR_BLOCK + len(ref_rows))
        for j, sample_rows in enumerate(samples.split(PR_BLOCK)):
            sample_slice = slice(j * PR_BLOCK, j * PR_BLOCK + len(sample_rows))
            distances = adm_sq_distances(ref_rows, sample_rows)  # (R, S)
            ref_covered[ref_slice] |= (distances <= sample_radii[sample_slice][None]).any(dim=1)
            sample_covered[sample_slice] |= (distances <= ref_radii[ref_slice][:, None]).any(dim=0)
    return float(sample_covered.double().mean()), float(ref_covered.double().mean())


# References.

@dataclass
class Reference:
    """A reference batch: its images (for precision/recall or missing statistics) and any stored statistics."""

    path: Path
    images: NpzImages | FolderImages | None
    pool: Stats | None = None
    spatial: Stats | None = None
    features: str = INCEPTION  # the extractor that made the stored statistics


def open_reference(path: Path, resize: int | None = None, num_workers: int = 4) -> Reference:
    """An ADM reference .npz (arr_0 and/or mu, sigma, mu_s, sigma_s) or a folder of images."""
    if not path.exists():
        raise UserError(f"reference not found: {path}",
                        "pass an ADM reference .npz such as VIRTUAL_imagenet256_labeled.npz, or a folder of images")
    if path.is_dir() or path.suffix.lower() != ".npz":
        return Reference(path, open_images(path, resize, num_workers, role="reference"))
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {path} as an .npz: {exc or 'the file is empty'}",
                        "pass an ADM reference .npz") from None
    with data:
        keys = set(data.files)
        if "arr_0" not in keys and "mu" not in keys:
            raise UserError(f"{path} has neither arr_0 nor mu/sigma",
                            "an ADM reference batch stores images as arr_0 and statistics as mu, sigma, mu_s, sigma_s")
        images = NpzImages(path) if "arr_0" in keys else None
        pool = _stored_stats(data, path, "mu", "sigma")
        spatial = _stored_stats(data, path, "mu_s", "sigma_s")
        features = str(data["feature_extractor"]) if "feature_extractor" in keys else INCEPTION
    return Reference(path, images, pool, spatial, features)


def _stored_stats(data, path: Path, mu_key: str, sigma_key: str) -> Stats | None:
    if mu_key not in data.files or sigma_key not in data.files:
        return None
    mu, sigma = torch.from_numpy(data[mu_key]).double(), torch.from_numpy(data[sigma_key]).double()
    if mu.dim() != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"{path}: {mu_key} {tuple(mu.shape)} and {sigma_key} {tuple(sigma.shape)} do not match",
                        "expected mu (D,) and sigma (D, D)")
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        raise UserError(f"{path}: {mu_key}/{sigma_key} hold NaN or infinite values, so every score would be NaN",
                        "rebuild the reference with `dit fid --make-ref`, or use one with arr_0 images")
    return mu, sigma


# Scoring.

@dataclass(frozen=True)
class FidConfig:
    """What `dit fid SAMPLES --ref REF` computes."""

    samples: Path
    ref: Path
    batch_size: int = 64
    features: str = INCEPTION
    inception_weights: Path | None = None
    resize: int | None = None
    num_workers: int = 4
    precision_recall: bool = True  # off for FID while training: its k-NN radii of a large reference cost minutes


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
    protocol: dict | None = None  # how the samples were drawn, from their `dit sample` provenance (ditcli.protocol)
    kid: float | None = None  # unbiased KID of the pool features; None when only stored reference statistics exist
    kid_std: float | None = None  # its standard deviation over the KID_SUBSETS subsets

    def to_dict(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings)}


def evaluate(config: FidConfig, device: torch.device, progress: Progress | None = None,
             ref_acts: Activations | None = None) -> FidResult:
    """Score samples against a reference with ADM's metrics; inputs are checked before any network loads.

    `ref_acts`: the reference's activations from an earlier call with the same reference and features (training
    evaluates against one reference many times), instead of extracting them again.
    """
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {config.batch_size}")
    samples = open_images(config.samples, config.resize, config.num_workers)
    ref = open_reference(config.ref, config.resize, config.num_workers)
    extractor, features = load_feature_extractor(config.features, device, config.inception_weights)
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

    # Pick the reference statistics: stored ones when they come from this extractor, else computed.
    if use_stored:
        ref_pool, ref_spatial = ref.pool, ref.spatial
        ref_stats = f"stored mu/sigma{'/mu_s/sigma_s' if ref.spatial else ''} of {ref.path.name}"
    else:
        ref_pool = ref_acts.pool.stats()
        ref_spatial = ref_acts.spatial.stats() if ref_acts.spatial else None
        ref_stats = f"computed from the {ref_acts.count} reference images"

    fid = frechet_distance(*sample_acts.pool.stats(), *ref_pool)
    sfid = None
    if sample_acts.spatial is not None and ref_spatial is not None:
        sfid = frechet_distance(*sample_acts.spatial.stats(), *ref_spatial)
    precision = recall = None
    if config.precision_recall and ref_acts is not None and min(ref_acts.count, sample_acts.count) > NEAREST_K:
        precision, recall = precision_recall(ref_acts.pool_features, sample_acts.pool_features)
    kid = kid_std = None
    if ref_acts is not None and min(ref_acts.count, sample_acts.count) >= 2:
        kid, kid_std = kernel_inception_distance(sample_acts.pool_features, ref_acts.pool_features)
    height, width = samples.resolution
    protocol, off_protocol = check_samples(config.samples, config.ref, sample_acts.count,
                                           height if height == width else None)
    return FidResult(fid, sfid, sample_acts.scores.score() if sample_acts.scores else None, precision, recall,
                     sample_acts.count, ref_acts.count if ref_acts else None, ref_stats, features,
                     (*_warnings(samples, ref, sample_acts, ref_acts, use_stored), *off_protocol), protocol, kid,
                     kid_std)


def reference_activations(config: FidConfig, device: torch.device) -> Activations | None:
    """The reference's activations in `config.features`, for later `evaluate(..., ref_acts=)` calls; None when the
    reference holds statistics only."""
    ref = open_reference(config.ref, config.resize, config.num_workers)
    if ref.images is None:
        return None
    extractor, _ = load_feature_extractor(config.features, device, config.inception_weights)
    return extract(ref.images.batches(config.batch_size), extractor, device)


def _stage(progress: Progress | None, stage: str, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    progress(stage, 0, total)
    return lambda done: progress(stage, done, total)


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


def _rank_deficient(acts: Activations) -> bool:
    """N images give a covariance of rank at most N - 1, so it needs more images than features to be full rank."""
    return acts.count <= acts.pool.mean.numel()


def _json_field(path: Path, key: str, default):
    try:
        return json.loads(path.read_text()).get(key, default)
    except (OSError, ValueError, AttributeError):
        return default


# Building references.

@dataclass(frozen=True)
class MakeRefResult:
    output: Path
    num_images: int
    resolution: int
    features: str
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "output": str(self.output), "warnings": list(self.warnings)}


def reference_images(source: str, resize: int | None = None, split: str | None = None, num_workers: int = 4):
    """What `dit train --data` reads, as reference images: an image folder streams from disk with ADM's center crop
    (to `resize`, default FOLDER_REF_SIZE); 'fashion-mnist[:split]', a folder of idx files or an .npz load whole at
    their own size unless `resize` is given."""
    path = Path(source)
    if path.is_dir() and not is_idx_source(source):
        if split is not None:
            raise UserError("--split applies to idx data (fashion-mnist or a folder of idx files), not an image "
                            "folder", "drop --split")
        return FolderImages(path, resize or FOLDER_REF_SIZE, num_workers)
    data = load_images(source, None, None, split=split)
    return ArrayImages(data.images, data.source, resize)


def make_ref(source: str | Path, output: Path, resolution: int | None = None, features: str = INCEPTION,
             inception_weights: Path | None = None, device: torch.device | str = "cpu", batch_size: int = 64,
             num_workers: int = 4, progress: Progress | None = None, split: str | None = None) -> MakeRefResult:
    """Write an ADM reference batch from any `dit train --data` source: arr_0, mu, sigma, mu_s, sigma_s.

    arr_0 streams into the zip as the images are scored. A `feature_extractor` entry records which extractor made
    the statistics; ADM's evaluator ignores it.
    """
    images = reference_images(str(source), resolution, split, num_workers)
    extractor, name = load_feature_extractor(features, torch.device(device), inception_weights)
    with replacing(output) as partial:
        acts = _write_reference(partial, images, extractor, name, torch.device(device), batch_size, progress)
    warnings = [f"only {acts.count} images for {acts.pool.mean.numel()} features: the covariance is rank-deficient"] \
        if _rank_deficient(acts) else []
    if acts.constant_images:
        warnings.append(f"{acts.constant_images} of {acts.count} images are a single flat colour")
    return MakeRefResult(output, acts.count, images.resolution[0], name, tuple(warnings))


def _write_reference(path: Path, images: FolderImages | ArrayImages, extractor: Callable, name: str,
                     device: torch.device, batch_size: int, progress: Progress | None) -> Activations:
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (images.num_images, *images.resolution, 3)}
            np.lib.format.write_array_header_1_0(f, header)
            acts = extract(_written(images.batches(batch_size), f), extractor, device, keep_pool=False,
                           progress=_stage(progress, "reference", images.num_images))
        arrays = dict(zip(("mu", "sigma"), acts.pool.stats()))
        if acts.spatial is not None:
            arrays.update(zip(("mu_s", "sigma_s"), acts.spatial.stats()))
        for key, value in {**{k: v.numpy() for k, v in arrays.items()}, "feature_extractor": np.array(name)}.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, value, allow_pickle=False)
    return acts


def _written(batches: Iterable[np.ndarray], f) -> Iterator[np.ndarray]:
    """Pass batches through, appending each one's bytes to `f`."""
    for batch in batches:
        f.write(np.ascontiguousarray(batch).tobytes())
        yield batch


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
