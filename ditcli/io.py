"""Files on disk, written whole or not at all, and read with one-line errors.

The one owner of: atomic file and folder writes, JSON files, safetensors reading, the weights-only `torch.load` and
the pickle-free `np.load` of an .npz.
Imports nothing from ditcli but `errors`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from ditcli.errors import UserError


def apply_umask(path: Path, mode: int) -> None:
    """Give a mkstemp/mkdtemp entry (private: 0600/0700) the permissions a plain open()/mkdir() would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def refuse_existing(path: Path, force: bool) -> None:
    """The one-line error for an output that exists without --force."""
    if Path(path).exists() and not force:
        raise UserError(f"{path} already exists", "pass --force to overwrite it")


def check_creatable(path: Path, flag: str, kind: str = "folder") -> None:
    """Refuse, before any work, a `kind` ("folder" or "file") at `path` that could not be written; creates nothing."""
    path = Path(path).absolute()
    broken = next((p for p in [path, *path.parents] if p.is_symlink() and not p.exists()), None)
    if broken is not None:  # a link to nowhere, or to itself: nothing can be created through it
        raise UserError(f"{flag} {path} is not writable: {broken} is a symbolic link that leads nowhere",
                        f"choose another {flag}, or remove the link")
    if path.exists() and not (path.is_dir() or path.is_file()):
        raise UserError(f"{flag} {path} is a device, pipe or socket, not a {kind}", f"choose another {flag}")
    if path.exists() and path.is_dir() != (kind == "folder"):
        raise UserError(f"{flag} {path} is a {'file' if kind == 'folder' else 'folder'}, not a {kind}",
                        f"choose another {flag}")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if existing != path and not existing.is_dir():
        raise UserError(f"{flag} {path} is not writable: {existing} is a file", f"choose another {flag}")
    folder = existing if existing.is_dir() else existing.parent  # where the entries get created
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} is not writable: {folder} does not allow it",
                        f"choose another {flag} or fix its permissions")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; rename it over `path` on success, remove it on failure.

    An OSError names the user's path, not our temporary file beside it.
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        apply_umask(Path(tmp), 0o666)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or type(exc).__name__}",
                        "check the free space and the permissions of its folder") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: Path, write: Callable[[Path], object], force: bool = False) -> None:
    """Call write(tmp_path), then rename over `path`; an existing file needs `force`."""
    refuse_existing(path, force)
    with replacing(path) as tmp:
        write(tmp)


def atomic_write_dir(path: Path, write: Callable[[Path], object], force: bool = False) -> None:
    """Call write(tmp_dir), then move it to `path`; an existing `path` needs `force` and is replaced at the end."""
    path = Path(path)
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        write(tmp)
        apply_umask(tmp, 0o777)
        for file in tmp.rglob("*"):  # safetensors' save_file creates its files private (0600)
            if file.is_file():
                apply_umask(file, 0o666)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            path.replace(old / path.name)
        tmp.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def json_text(data, indent: int | None = 2, sort_keys: bool = False) -> str:
    """The JSON text every ditcli file holds: indented, one trailing newline."""
    return json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n"


def write_json(path: Path, data, sort_keys: bool = False) -> None:
    """Write `data` as JSON, atomically (a reader never sees half a file)."""
    with replacing(path) as tmp:
        tmp.write_text(json_text(data, sort_keys=sort_keys))


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or one line saying why not."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # or nested too deep
        raise UserError(f"{path} is not readable JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


@contextlib.contextmanager
def safetensors_errors(path: Path) -> Iterator[None]:
    """The one error block for safetensors reading: a truncated or corrupt file is one line."""
    try:
        yield
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file: {' '.join(str(exc).split())}",
                        "the file is truncated or corrupt; fetch it again") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a .safetensors file (no tensors read)."""
    with safetensors_errors(path), safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, or one line saying it is truncated or corrupt."""
    metadata = safetensors_metadata(path)
    with safetensors_errors(path):
        return load_file(str(path)), metadata


def safe_torch_load(path: str | os.PathLike):
    """torch.load with weights_only=True and only argparse.Namespace allowed; one-line errors otherwise."""
    refuse_special(path, "a checkpoint file", "pass a .pt file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")  # garbage bytes read as a protocol number
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if culprit is None:  # the restricted unpickler stopped on bytes it cannot parse, before any global
            raise UserError(f"{path} is not a readable checkpoint: the weights-only unpickler cannot parse it",
                            "the file is corrupt or not a PyTorch weight file; fetch it again") from None
        raise UserError(f"refusing to load {path}: it contains pickled code or objects ({culprit.group(1)}) that a "
                        f"weight file should not", "only tensors, plain containers and argparse.Namespace are "
                        "allowed") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, SafetensorError) as exc:  # torch reads *.safetensors
        if _is_npz(path):
            raise UserError(f"{path} is a NumPy .npz archive (images or statistics), not a checkpoint",
                            "pass a .pt, a .safetensors or a diffusers folder") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first)  # torch's C++ source position
        first = first.split(". ")[0]  # torch's zip errors go on for several sentences of advice
        raise UserError(f"{path} is not a readable checkpoint: {first}",
                        "the file is truncated or corrupt; fetch it again") from None
    except (IndexError, KeyError, ValueError) as exc:  # the unpickler tripping over random bytes
        raise UserError(f"{path} is not a readable checkpoint: the unpickler failed with {type(exc).__name__}",
                        "the file is corrupt or not a PyTorch weight file; fetch it again") from None


def refuse_special(path: str | os.PathLike, kind: str, hint: str) -> None:
    """A pipe, socket or device where `kind` belongs is refused: reading a pipe waits for a writer forever."""
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise UserError(f"{path} is a pipe, socket or device, not {kind}", hint)


def open_npz(path: Path, hint: str, reads: tuple[str, ...]):
    """`np.load` of an .npz, never of pickles: a file that is no zip (a text file, a lone .npy, a pickle named .npz),
    a cut one, or one whose arrays the reader `reads` hold Python objects is one line, with `hint`."""
    refuse_special(path, "an .npz", hint)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz: np.savez writes a zip of .npy arrays, and this file is no zip", hint)
    try:
        archive = np.load(path, allow_pickle=False)
        pickled = [name for name in archive.files if name in reads and _array_dtype(archive.zip, name).hasobject]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"cannot read {path} as an .npz: {' '.join(str(exc).split()) or type(exc).__name__}",
                        hint) from None
    if pickled:
        archive.close()
        raise UserError(f"{path} holds {pickled[0]} as Python objects, which only unpickling reads", hint)
    return archive


def _array_dtype(archive: zipfile.ZipFile, name: str) -> np.dtype:
    """The dtype an .npz member's header declares, read without its data."""
    with archive.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return header(f)[2]


def _is_npz(path: str | os.PathLike) -> bool:
    """A zip whose members are all .npy files: what np.savez writes."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return bool(names) and all(name.endswith(".npy") for name in names)
