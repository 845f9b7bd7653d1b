"""Reference statistics: an ADM reference batch or a folder opened for scoring, and `dit fid --make-ref`, which
writes one from a folder, an .npz or Fashion-MNIST's idx files in the features asked for.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ditcli.errors import UserError
from ditcli.evaluation.features import (
    DINOV2,
    INCEPTION,
    Activations,
    Progress,
    Stats,
    _rank_deficient,
    _stage,
    extract,
    load_feature_extractor,
)
from ditcli.evaluation.readers import (
    ArrayImages,
    FolderImages,
    NpzImages,
    open_images,
    reference_images,
)
from ditcli.io import open_npz, replacing


@dataclass
class Reference:
    """A reference batch: its images (for precision/recall or missing statistics) and any stored statistics."""

    path: Path
    images: NpzImages | FolderImages | None
    pool: Stats | None = None
    spatial: Stats | None = None
    features: str = INCEPTION  # the extractor that made the stored statistics


REFERENCE_ARRAYS = ("arr_0", "mu", "sigma", "mu_s", "sigma_s", "feature_extractor")  # what a reference is read for


def open_reference(path: Path, resize: int | None = None, num_workers: int = 4) -> Reference:
    """An ADM reference .npz (arr_0 and/or mu, sigma, mu_s, sigma_s) or a folder of images."""
    if not path.exists():
        raise UserError(f"reference not found: {path}",
                        "pass an ADM reference .npz such as VIRTUAL_imagenet256_labeled.npz, or a folder of images")
    if path.is_dir() or path.suffix.lower() != ".npz":
        return Reference(path, open_images(path, resize, num_workers, role="reference"))
    with open_npz(path, "pass an ADM reference .npz", REFERENCE_ARRAYS) as data:
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


def _json_field(path: Path, key: str, default):
    try:
        return json.loads(path.read_text()).get(key, default)
    except (OSError, ValueError, AttributeError):
        return default


@dataclass(frozen=True)
class MakeRefResult:
    output: Path
    num_images: int
    resolution: int
    features: str
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "output": str(self.output), "warnings": list(self.warnings)}


def make_ref(source: str | Path, output: Path, resolution: int | None = None, features: str | None = INCEPTION,
             inception_weights: Path | None = None, device: torch.device | str = "cpu", batch_size: int = 64,
             num_workers: int = 4, progress: Progress | None = None, split: str | None = None,
             dinov2_weights: str | None = None) -> MakeRefResult:
    """Write an ADM reference batch from any `dit train --data` source: arr_0, mu, sigma, mu_s, sigma_s.

    arr_0 streams into the zip as the images are scored. A `feature_extractor` entry records which extractor made
    the statistics; ADM's evaluator ignores it. `features` None is Inception's, as for ADM's batches.
    """
    images = reference_images(str(source), resolution, split, num_workers)
    weights = dinov2_weights if features == DINOV2 else inception_weights
    extractor, name = load_feature_extractor(features or INCEPTION, torch.device(device), weights)
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
