"""Image sources for `dit fid`: ADM .npz batches, arrays, image folders (grid.png skipped), center-cropped and
resized the way the reference batches were, in uint8 RGB.
"""

from __future__ import annotations

import zipfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ditcli.data.images import IMAGE_SUFFIXES, image_files
from ditcli.data.sources import center_crop_arr, is_idx_source, load_images
from ditcli.errors import UserError
from ditcli.evaluation.features import MIN_IMAGES
from ditcli.io import refuse_special

FOLDER_REF_SIZE = 256  # ADM's ImageNet 256 reference batches; `--resize` picks another
SKIPPED_FILES = ("grid.png",)  # the contact sheet `dit sample` writes next to its images


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
        if shape[0] < MIN_IMAGES:  # found before any image is read, not after a pass over the other side
            held = "no images" if shape[0] == 0 else "1 image"
            raise UserError(f"{path}: arr_0 holds {held}, and a covariance needs at least {MIN_IMAGES}",
                            f"pass a batch with at least {MIN_IMAGES} images")
        self.num_images, self.resolution = shape[0], (shape[1], shape[2])
        self.channels = shape[3] if len(shape) == 4 else 1

    def _open(self):
        refuse_special(self.path, "an .npz", "pass an ADM .npz written by np.savez")
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
        if len(self.files) < MIN_IMAGES:
            raise UserError(f"{path} holds {len(self.files)} image, and a covariance needs at least {MIN_IMAGES}",
                            f"pass a folder with at least {MIN_IMAGES} images")
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
