"""Training data: image folders, Fashion-MNIST idx files and .npz arrays, as uint8 images with labels.

Every source becomes an `ImageSet`: uint8 images (N, H, W, C) already cropped to the training size, integer labels,
and class names (None for an unconditional set). Latent models encode an ImageSet once into a `LatentCache`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ditcli.data.images import IMAGE_SUFFIXES, image_files
from ditcli.errors import UserError
from ditcli.io import open_npz, refuse_special

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


@dataclass
class ImageSet:
    """Images (N, H, W, C) uint8 with labels (N,) int64; `class_names` is None when unconditional."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str] | None
    source: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return 0 if self.class_names is None else len(self.class_names)

    def fingerprint(self) -> str:
        """A short hash of the pixels and labels, to tell whether a latent cache still matches."""
        digest = hashlib.sha256()
        digest.update(str(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images[:: max(1, len(self) // 512)]).tobytes())
        digest.update(self.labels.tobytes())
        return digest.hexdigest()[:16]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise UserError(f"no {stem}[.gz] in {root}", "point --data at the folder holding the Fashion-MNIST idx files")


IDX_SPLITS = {"train": "train", "test": "t10k"}  # split -> file prefix


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR, split: str = "train") -> ImageSet:
    """Fashion-MNIST (Xiao et al., 2017): 60k train / 10k test 28x28 grayscale images, 10 classes."""
    if split not in IDX_SPLITS:
        raise UserError(f"unknown split {split!r}", f"choose {' or '.join(IDX_SPLITS)}")
    if not root.exists():
        raise UserError(f"Fashion-MNIST not found at {root}", "apt-get install dataset-fashion-mnist")
    prefix = IDX_SPLITS[split]
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return ImageSet(images[..., None], labels, list(FASHION_MNIST_CLASSES), f"fashion-mnist:{split}")


def load_npz(path: Path, image_size: int | None, channels: int | None) -> ImageSet:
    """An .npz of uint8 images (`images` or `arr_0`, NHWC or NHW) with optional `labels`/`arr_1`, `class_names`."""
    images, labels, names = _read_npz_arrays(path)
    channels = channels or images.shape[-1]
    if image_size and images.shape[1] != image_size:  # crop and resize each image like a folder's
        images = np.stack([_fit(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im), image_size, channels)
                           for im in images])
    else:
        images = _channels(images, channels)
    return ImageSet(images, labels, names, str(path))


def _read_npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """The images (N, H, W, C), labels (N,) and class names of an .npz, each checked against the others."""
    try:
        with open_npz(path, "write it with np.savez(path, images=uint8 NHWC array, labels=ints)",
                      ("images", "arr_0", "labels", "arr_1", "class_names")) as data:
            key = "images" if "images" in data else "arr_0" if "arr_0" in data else None
            if key is None:
                held = ", ".join(data.files) or "nothing"
                raise UserError(f"{path} has no 'images' or 'arr_0' array (it holds: {held})",
                                "save the images with np.savez(path, images=uint8 NHWC array, labels=ints)")
            label_key = "labels" if "labels" in data else "arr_1" if "arr_1" in data else None
            images = data[key]
            labels = data[label_key] if label_key else None
            names = data["class_names"] if "class_names" in data else None
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"{path} is not a readable .npz ({' '.join(str(exc).split()) or type(exc).__name__})",
                        "the file is truncated or not written by np.savez; write it again") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UserError(f"{path}:{key} must be uint8 NHWC or NHW, got {images.dtype} {images.shape}",
                        "convert it, e.g. np.savez(path, images=array.astype(np.uint8))")
    images = images[..., None] if images.ndim == 3 else images
    if len(images) == 0 or min(images.shape[1:3]) == 0:
        raise UserError(f"{path}:{key} holds no images (shape {images.shape})", "pass an .npz with at least one image")
    if images.shape[-1] not in (1, 3):
        raise UserError(f"{path}:{key} has {images.shape[-1]} channels", "store grayscale (1) or RGB (3) images")
    if labels is None:
        return images, np.zeros(len(images), np.int64), None
    labels = _checked_labels(labels, len(images), f"{path}:{label_key}")
    if names is None:
        return images, labels, [str(i) for i in range(int(labels.max()) + 1)]
    names = [str(n) for n in np.asarray(names).reshape(-1)]
    if int(labels.max()) >= len(names):
        raise UserError(f"{path}: label {int(labels.max())} has no entry in class_names ({len(names)} names)",
                        "store one class name per label id")
    return images, labels, names


def _checked_labels(labels: np.ndarray, count: int, name: str) -> np.ndarray:
    """Integer class ids (N,) >= 0, one per image."""
    if labels.ndim != 1 or len(labels) != count:
        raise UserError(f"{name} has shape {labels.shape}, but there are {count} images",
                        "store one integer label per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{name} holds {labels.dtype} values, not integer class ids", "store labels as integers")
    if count and labels.min() < 0:
        raise UserError(f"{name} holds negative class ids (lowest {int(labels.min())})",
                        "class ids count from 0")
    return labels.astype(np.int64)


def _channels(images: np.ndarray, channels: int) -> np.ndarray:
    if images.shape[-1] == channels:
        return images
    if channels == 1:
        return np.round(images[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[
            ..., None].astype(np.uint8)
    return np.repeat(images[..., :1], channels, axis=-1)


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion `image_datasets.py`): halve with a box filter while the short side is at
    least 2 * size, resize the short side to `size` with bicubic, then cut the centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def _fit(image: Image.Image, size: int | None, channels: int) -> np.ndarray:
    image = image.convert("L" if channels == 1 else "RGB")
    array = center_crop_arr(image, size) if size is not None else np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def load_folder(root: Path, image_size: int, channels: int) -> ImageSet:
    """Class sub-folders (ids in sorted name order) or a flat folder (unconditional); unreadable files skipped."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(d.name, image_files(d)) for d in subdirs] if subdirs else [(None, image_files(root))]
    groups = [(name, files) for name, files in groups if files]
    if not groups:
        raise UserError(f"no images found in {root}", f"expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    images, labels, skipped, too_small = [], [], [], []
    for label, (_, files) in enumerate(groups):
        for path in files:
            try:
                with _bombs_as_errors(), Image.open(path) as image:
                    image.load()
                    if min(image.size) < image_size:
                        too_small.append(path)
                        continue
                    images.append(_fit(image, image_size, channels))
                    labels.append(label)
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
                skipped.append(f"{path} ({_pixels(exc)} pixels: too large to decode safely)")
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
                skipped.append(str(path))
    if not images:
        detail = f"{len(too_small)} smaller than {image_size}px" if too_small else f"{len(skipped)} unreadable"
        raise UserError(f"no usable images in {root} ({detail})", "use a smaller --image-size or check the files")
    skipped += [f"{p} (smaller than {image_size}px)" for p in too_small]
    names = [name for name, _ in groups] if subdirs else None
    return ImageSet(np.stack(images), np.array(labels, np.int64), names, str(root), skipped)


@contextlib.contextmanager
def _bombs_as_errors():
    """PIL's DecompressionBombWarning for a huge image raised as an error, so the caller reports it in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _pixels(exc: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(found.group(1)):,}" if found else "too many"


def is_idx_source(data: str) -> bool:
    """'fashion-mnist[:split]' or a folder holding MNIST-style idx files."""
    path = Path(data)
    return data.partition(":")[0] == "fashion-mnist" or (path.is_dir() and any(path.glob("*-images-idx3-ubyte*")))


def load_images(data: str, image_size: int | None, channels: int | None, split: str | None = None) -> ImageSet:
    """Any supported source: "fashion-mnist[:split]", a folder of idx files, an .npz, or an image folder.

    `split` (train or test, default train) picks the split of idx data; `channels` None keeps an .npz's own.
    """
    check_source(data, split)
    name, _, named = data.partition(":")
    if name == "fashion-mnist":
        return load_fashion_mnist(FASHION_MNIST_DIR, named or split or "train")
    path = Path(data)
    if is_idx_source(data):
        return load_fashion_mnist(path, split or "train")
    if path.is_file():
        return load_npz(path, image_size, channels)
    return load_folder(path, image_size, channels or 3)


def check_source(data: str, split: str | None = None) -> None:
    """What `load_images` can tell without reading any image: the source exists, is of a kind it reads, and the
    split fits it. Cheap, so commands run it before anything slow (a VAE load, a download)."""
    name, _, named = data.partition(":")
    if name == "fashion-mnist":
        if named and split and named != split:
            raise UserError(f"{data!r} names the {named} split but --split says {split}", "give the split once")
        return
    path = Path(data)
    if not path.exists():
        raise UserError(f"data not found: {path}", "pass an image folder, an .npz, a folder of idx files or "
                                                   "'fashion-mnist'")
    refuse_special(path, "an image folder or an .npz", "pass an image folder, an .npz or a folder of idx files")
    if is_idx_source(data):
        return
    if split is not None:
        raise UserError(f"--split applies to idx data (fashion-mnist or a folder of idx files), not {path}",
                        "drop --split")
    if path.is_file() and path.suffix != ".npz":
        raise UserError(f"{path} is not a folder or an .npz", "pass an image folder, an .npz or 'fashion-mnist'")


