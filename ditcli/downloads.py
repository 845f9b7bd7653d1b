"""The ditcli home directory, resumable downloads verified by size and sha256, and remembered file hashes (a
file's sha256 kept by path, size and mtime so large checkpoints are hashed once).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ditcli.errors import UserError
from ditcli.io import read_json, write_json
from ditcli.version import __version__

ProgressFn = Callable[[int, int | None], None] | None
CHUNK = 1 << 20


def home_dir() -> Path:
    """Where downloads go: $DIT_HOME, else the user cache directory."""
    if os.environ.get("DIT_HOME"):
        return Path(os.environ["DIT_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ditcli"


class DownloadError(Exception):
    """A download that failed or did not check out; the message says why in a few words."""


def download(url: str, dest: Path, size: int | None = None, sha256: str | None = None, progress: ProgressFn = None,
             attempts: int = 3, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest` through `dest.part`, resuming a partial file with an HTTP Range request.

    An interrupted transfer is resumed up to `attempts` times while it makes progress; the part is kept on failure so a
    later call resumes it. The size and sha256 are checked where known, then the part is renamed into place.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(attempts):
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch(url, part, progress, timeout)
            break
        except (urllib.error.URLError, OSError, http.client.HTTPException, DownloadError) as exc:
            grew = part.exists() and part.stat().st_size > before
            if attempt == attempts - 1 or not grew:
                raise DownloadError(_reason(exc)) from None
    _verify(part, size, sha256)
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, progress: ProgressFn, timeout: float) -> None:
    """One request: append to `part` from its current size (206), or start over (200)."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"ditcli/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # the part already holds the whole file
            return
        raise
    with response:
        if start and response.status != 206:
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        done = start
        with open(part, "ab" if start else "wb") as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    if total is not None and done < total:
        raise DownloadError(f"connection closed after {done} of {total} bytes")


def _verify(part: Path, size: int | None, sha256: str | None) -> None:
    actual = part.stat().st_size
    if size is not None and actual != size:
        if actual > size:
            part.unlink()
        raise DownloadError(f"got {actual} bytes, expected {size}")
    if sha256 is not None and file_sha256(part) != sha256.lower():
        part.unlink()
        raise DownloadError("the sha256 checksum does not match (the partial file was removed; retry)")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"no connection ({exc.reason})"
    return " ".join(str(exc).split()) or type(exc).__name__


# Remembered hashes: at most this many files, the oldest entry dropped first.
REMEMBERED_HASHES = 256


@dataclass(frozen=True)
class RememberedHash:
    """A checkpoint's sha256, and whether it still has to be written down (`remember`) for the next run."""

    sha256: str
    path: Path
    key: str | None  # None: a folder, always hashed
    new: bool

    def remember(self) -> None:
        """Write the hash into the home directory's memo. Called once the run goes ahead, so that a command refused
        for bad input leaves nothing behind."""
        if not self.new or self.key is None:
            return
        memo = {k: v for k, v in _memo().items() if not k.startswith(f"{self.path}|")}
        memo[self.key] = self.sha256
        try:
            write_json(home_dir() / "sha256.json", dict(list(memo.items())[-REMEMBERED_HASHES:]))
        except UserError:
            pass  # a read-only home directory only costs the next run a re-read


def remembered_sha256(path: str | os.PathLike) -> RememberedHash:
    """file_sha256 of a file, remembered in the home directory under its path, size, modification time and inode.

    A second `dit sample` over the same multi-GB checkpoint then skips reading it again (2 s at DiT-XL/2 on a CPU).
    A file that is rewritten, even in place, changes its key and is hashed afresh. Folders are always hashed.
    """
    path = Path(path).resolve()
    if path.is_dir():
        return RememberedHash(file_sha256(path), path, None, False)
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    known = _memo().get(key)
    if isinstance(known, str):
        return RememberedHash(known, path, key, False)
    return RememberedHash(file_sha256(path), path, key, True)


def _memo() -> dict:
    try:
        return read_json(home_dir() / "sha256.json")
    except UserError:
        return {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file; of a folder (a diffusers checkpoint), the sha256 of its files' relative paths and hashes."""
    path = Path(path)
    if path.is_dir():
        listing = "".join(f"{p.relative_to(path).as_posix()} {file_sha256(p)}\n"
                          for p in sorted(path.rglob("*")) if p.is_file())
        return hashlib.sha256(listing.encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
