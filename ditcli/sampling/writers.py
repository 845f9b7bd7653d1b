"""Where `dit sample` puts its images: a folder of PNGs with a captioned grid.png, and an ADM evaluator .npz.

Each writer knows which images it already holds (so a rerun skips them), writes batches as they come, and finishes
on rank 0. Checks of the output paths run before any sampling starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ditcli.data.images import GRID_MAX, make_grid, pil_image
from ditcli.diffusion.guidance import image_seed
from ditcli.errors import UserError
from ditcli.io import check_creatable, replacing, write_json
from ditcli.sampling.generate import Batch

StepFn = Callable[[int, int], None] | None


def check_writable(folder: Path, flag: str) -> None:
    """Create `folder` and prove a file can be written there, before any sampling starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".ditcli-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {folder} is not writable: {exc.strerror or exc}",
                        f"choose another {flag} or fix its permissions") from None


def check_outputs(out: Path | None, npz: Path | None) -> None:
    """--out must be a folder and --npz a file, each where it can be written; nothing is created yet."""
    for flag, path, kind in (("--out", out, "folder"), ("--npz", npz, "file")):
        if path is not None:
            check_creatable(path, flag, kind)


def _previous_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("run_key")
    except (OSError, ValueError):
        return None


PNG_NAME = re.compile(r"^\d{6,}_.+_seed\d+\.png$")


class ImageDirWriter:
    """`--out DIR`: one PNG per image (its settings in PNG text chunks), grid.png and provenance.json."""

    def __init__(self, root: Path, seed: int, caption: Callable[[int], str], file_label: Callable[[int], str],
                 grid_columns: int | None = None):
        self.root = Path(root)
        self.seed = seed
        self.caption = caption
        self.file_label = file_label
        self.grid_columns = grid_columns
        self.text: dict[str, str] = {}

    def filename(self, index: int, label: int) -> str:
        return f"{index:06d}_{self.file_label(label)}_seed{self.seed}.png"

    def check(self, run_key: str, force: bool) -> None:
        """Refuse, changing nothing, a folder holding another run (unless `force`)."""
        previous = _previous_key(self.root / "provenance.json")
        if previous is not None and previous != run_key and not force:
            raise UserError(f"--out {self.root} holds samples of a different run",
                            "choose another --out, or pass --force to replace them")

    def prepare(self, run_key: str, force: bool, text: dict[str, str]) -> None:
        """Check the folder; a folder holding another run is refused unless `force`, which clears its images."""
        self.check(run_key, force)
        check_writable(self.root, "--out")
        provenance = self.root / "provenance.json"
        previous = _previous_key(provenance)
        if previous is not None and previous != run_key:
            for name in os.listdir(self.root):
                if PNG_NAME.match(name) or name == "grid.png":
                    (self.root / name).unlink()
        write_json(provenance, {"run_key": run_key, "complete": False})
        self.text = text

    def done(self, labels: Sequence[int]) -> set[int]:
        present = set(os.listdir(self.root)) if self.root.is_dir() else set()
        return {i for i, label in enumerate(labels) if self.filename(i, label) in present}

    def write(self, batch: Batch) -> None:
        for index, label, image in zip(batch.indices, batch.labels, batch.images.numpy()):
            info = PngInfo()
            for key, value in {**self.text, "index": str(index), "class": str(label), "seed": str(self.seed),
                               "image_seed": str(image_seed(self.seed, index))}.items():
                info.add_text(key, value)
            with replacing(self.root / self.filename(index, label)) as tmp:
                pil_image(image).save(tmp, format="PNG", pnginfo=info)

    def finish(self, labels: Sequence[int], provenance: dict) -> list[Path]:
        count = min(len(labels), GRID_MAX)
        images = [np.asarray(Image.open(self.root / self.filename(i, labels[i]))) for i in range(count)]
        columns = self.grid_columns if self.grid_columns and self.grid_columns <= 16 else math.ceil(math.sqrt(count))
        with replacing(self.root / "grid.png") as tmp:
            make_grid(images, [self.caption(labels[i]) for i in range(count)], columns).save(tmp, format="PNG")
        write_json(self.root / "provenance.json", {**provenance, "complete": True})
        return [self.root / "grid.png", self.root / "provenance.json"]


class NpzWriter:
    """`--npz FILE` in the ADM evaluator's format (`arr_0`, uint8 NHWC), built without holding the images in memory.

    Each batch lands in FILE.parts/ as a .npy shard plus a .json list of its indices (written last, so a shard counts
    only when whole). Rank 0 then streams the shards, in index order, into one .npz, and removes the parts.
    """

    def __init__(self, path: Path, rank: int = 0):
        self.path = Path(path)
        self.rank = rank
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.sidecar = self.path.with_name(self.path.stem + ".provenance.json")

    def check(self, run_key: str, force: bool) -> None:
        """Refuse, changing nothing, a folder in FILE's place, or a FILE or parts of another run (unless `force`)."""
        if self.path.is_dir():
            raise UserError(f"--npz {self.path} is a folder", "name the .npz file to write, e.g. --npz samples.npz")
        if self.path.exists() and not force and _previous_key(self.sidecar) != run_key:
            raise UserError(f"{self.path} already exists", "choose another --npz, or pass --force to replace it")
        previous = _previous_key(self.parts / "run.json")
        if self.parts.exists() and previous != run_key and not force:
            raise UserError(f"{self.parts} holds the unfinished parts of a different run",
                            "pass --force to discard them, or use the same settings to resume")

    def prepare(self, run_key: str, force: bool) -> bool:
        """Check the target; True when FILE already holds this very run. Parts of another run need `force`."""
        self.check(run_key, force)
        check_writable(self.path.parent, "--npz")
        if self.path.exists() and not force:
            return True
        previous = _previous_key(self.parts / "run.json")
        if self.parts.exists() and (force or previous != run_key):
            shutil.rmtree(self.parts)
        self.parts.mkdir(parents=True, exist_ok=True)
        write_json(self.parts / "run.json", {"run_key": run_key})
        return False

    def shards(self) -> list[tuple[list[int], Path]]:
        if not self.parts.is_dir():
            return []
        found = []
        for index_file in sorted(self.parts.glob("shard-*.json")):
            found.append((json.loads(index_file.read_text()), index_file.with_suffix(".npy")))
        return found

    def complete(self) -> bool:
        """FILE holds this run already (prepare left no parts folder beside it)."""
        return self.path.exists() and not self.parts.exists()

    def done(self, labels: Sequence[int]) -> set[int]:
        if self.complete():
            return set(range(len(labels)))
        return {i for indices, _ in self.shards() for i in indices}

    def write(self, batch: Batch) -> None:
        if self.complete():
            return
        name = f"shard-{batch.indices[0]:09d}-r{self.rank}"
        with replacing(self.parts / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, batch.images.numpy())
        with replacing(self.parts / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(batch.indices))

    def finish(self, labels: Sequence[int], provenance: dict) -> list[Path]:
        if self.complete():
            return [self.path, self.sidecar]
        where = {}
        for indices, npy in self.shards():
            for row, i in enumerate(indices):
                where.setdefault(i, (npy, row))
        missing = [i for i in range(len(labels)) if i not in where]
        if missing:
            raise UserError(f"{len(missing)} images are missing from {self.parts} (first: {missing[0]})",
                            "run the same command again to generate them")
        write_npz(self.path, [where[i] for i in range(len(labels))])
        shutil.rmtree(self.parts)
        write_json(self.sidecar, provenance)
        return [self.path, self.sidecar]


def write_npz(path: Path, rows: list[tuple[Path, int]]) -> None:
    """Stream images, given as (shard .npy, row) in order, into an .npz holding one uint8 array `arr_0`.

    The zip entry is stored uncompressed with a fixed timestamp, so equal images give byte-identical files.
    """
    @lru_cache(maxsize=64)
    def shard(npy: Path) -> np.ndarray:
        return np.load(npy, mmap_mode="r")

    first = shard(rows[0][0])
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": (len(rows), *first.shape[1:])}
    info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
    with replacing(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for npy, row in rows:
                    f.write(np.ascontiguousarray(shard(npy)[row]).tobytes())
