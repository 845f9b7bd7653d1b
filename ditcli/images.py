"""Image files and pictures of many images: the suffixes ditcli reads, folder listing, and the plain tiled grid.

Imports nothing from ditcli.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

# Every suffix PIL decodes that ditcli reads as an image (training folders, `dit fid` folders).
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def image_files(folder: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Every image file under `folder` (recursively, sorted by path), except those named in `skip`."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in skip
                  and p.is_file())


def image_grid(images: np.ndarray, columns: int) -> Image.Image:
    """uint8 images (N, H, W, C) tiled row by row into one picture."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * h, columns * w, c), dtype=np.uint8)  # (rows H, columns W, C)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)
