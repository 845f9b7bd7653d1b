"""Image files and pictures of many images: the suffixes ditcli reads, folder listing, tiled and captioned grids.

Imports nothing from ditcli.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GRID_MAX = 100  # the most images one grid.png shows

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


def pil_image(image: np.ndarray) -> Image.Image:
    """One uint8 image (H, W, C) as a PIL image; one channel becomes grey."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)  # (H, W) or (H, W, 3)


def make_grid(images: list[np.ndarray], captions: list[str], columns: int, min_cell: int = 96,
              gap: int = 2) -> Image.Image:
    """Images (H, W, C) uint8 in rows of `columns`, upscaled to at least `min_cell` px, each with a caption below."""
    height, width = images[0].shape[:2]
    scale = max(1, math.ceil(min_cell / width))
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default()
    line = font.getbbox("Ag")[3] + 4
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (cell_w + gap) - gap, rows * (cell_h + line)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, caption) in enumerate(zip(images, captions)):
        x, y = (k % columns) * (cell_w + gap), (k // columns) * (cell_h + line)
        grid.paste(pil_image(image).convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (x, y))
        draw.text((x + 2, y + cell_h + 1), _fit_caption(caption, font, cell_w - 4), fill="black", font=font)
    return grid


def _fit_caption(text: str, font, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
