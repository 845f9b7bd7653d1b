"""Hugging Face hub ids as checkpoint sources: `org/name` or `org/name@revision`, resolved through huggingface_hub.

Only the files a DiT needs are fetched (`model_index.json`, the transformer's `config.json` and its weights) into the
ordinary Hugging Face cache, so later runs, and runs with HF_HUB_OFFLINE=1, use the cached copy. A local path spelled
like a hub id wins. Nothing here prints; every failure is one UserError line.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ditcli.errors import UserError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")  # `runs/x.pt` is a path, never a repo
PIPELINE_INDEX = "model_index.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
OFFLINE_ENV = ("DIT_OFFLINE", "HF_HUB_OFFLINE")
CACHE_FOLDER = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)")


@dataclass(frozen=True)
class HubId:
    """A hub model repository and an optional revision (branch, tag or commit)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo if self.revision is None else f"{self.repo}@{self.revision}"


def parse_hub_id(text: str) -> HubId | None:
    """`org/name[@rev]` as a HubId; None for anything else, including names ending like weight files."""
    match = HUB_ID.fullmatch(str(text))
    if match is None or "--" in match["repo"] or match["repo"].lower().endswith(FILE_SUFFIXES):
        return None
    return HubId(match["repo"], match["revision"])


def resolve_source(source: str | os.PathLike, offline: bool | None = None) -> Path:
    """A local path as given (it wins over a hub id spelled the same), else the cached snapshot folder of a hub id."""
    path = Path(source)
    hub_id = None if path.exists() else parse_hub_id(str(source))
    return path if hub_id is None else fetch_dit(hub_id, offline)


def cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_of(path: str | os.PathLike) -> str | None:
    """The repo id of a path inside the hub cache (`.../models--org--name/snapshots/...`), else None."""
    for part in reversed(Path(path).parts):
        if match := CACHE_FOLDER.fullmatch(part):
            return f"{match['org']}/{match['name']}"
    return None


def is_offline(offline: bool = False) -> bool:
    """Whether downloads are off: `offline`, or DIT_OFFLINE / HF_HUB_OFFLINE set to a true value."""
    flags = (os.environ.get(name, "").strip().lower() for name in OFFLINE_ENV)
    return offline or any(flag in ("1", "true", "yes", "on") for flag in flags)


def fetch_dit(hub_id: HubId, offline: bool | None = None) -> Path:
    """The snapshot folder holding a diffusers DiT's index, transformer config and weights; fetched if not cached."""
    offline = is_offline() if offline is None else offline
    unreachable = None if offline else hub_unreachable()
    why = "downloads are off (offline)" if offline else f"the hub cannot be reached ({unreachable})"
    local = offline or unreachable is not None  # a dead network answers from the cache at once, with no retries
    if local:
        _check_cached(hub_id)
    index = _download(hub_id, PIPELINE_INDEX, local, why, required=False)
    prefix = "transformer/" if index is not None else ""  # a DiTPipeline repo, or a bare DiTTransformer2DModel repo
    config = _download(hub_id, f"{prefix}config.json", local, why)
    safetensors, pickled = (prefix + name for name in WEIGHT_FILES)
    if _download(hub_id, safetensors, local, why, required=False) is None:  # the .bin only where there is no other
        _download(hub_id, pickled, local, why)
    return config.parent.parent if prefix else config.parent


def _download(hub_id: HubId, filename: str, local: bool, why: str, required: bool = True) -> Path | None:
    """One file through hf_hub_download (from the cache only when `local`); None for an absent optional file,
    one-line errors otherwise, which say `why` a file that is not cached cannot be fetched."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(hub_id.repo, filename, revision=hub_id.revision, cache_dir=cache_dir(),
                                    local_files_only=local))
    except RepositoryNotFoundError:
        raise UserError(f"hub repo {hub_id.repo} not found, and there is no local path {hub_id}",
                        "check the id; private or gated repos need `hf auth login`") from None
    except RevisionNotFoundError:
        raise UserError(f"hub repo {hub_id.repo} has no revision {hub_id.revision!r}",
                        "pass a branch, tag or commit of that repo, or drop @REVISION") from None
    except LocalEntryNotFoundError:  # offline, or the hub unreachable, and not cached
        if not required:
            return None
        _check_cached(hub_id)
        raise UserError(f"{filename} of {hub_id} is not in the Hugging Face cache at {cache_dir()} and {why}",
                        "connect, and unset HF_HUB_OFFLINE / DIT_OFFLINE, once to fetch it") from None
    except EntryNotFoundError:
        if not required:
            return None
        raise UserError(f"hub repo {hub_id} has no {filename}, so it is not a diffusers DiT",
                        "pass a DiTPipeline repo or a DiTTransformer2DModel repo") from None
    except HFValidationError as exc:
        raise UserError(f"{hub_id} is not a valid hub id: {_first_line(exc)}", "write it as org/name[@revision]") \
            from None
    except (HfHubHTTPError, OSError) as exc:
        raise UserError(f"cannot fetch {filename} of hub repo {hub_id}: {_first_line(exc)}",
                        "check the connection, or set HF_HUB_OFFLINE=1 to use the cache") from None


def _check_cached(hub_id: HubId) -> None:
    """Without the hub, name what is missing from the cache: the repo, or the revision (with the cached ones)."""
    root = cache_dir() / f"models--{hub_id.repo.replace('/', '--')}"
    if not root.is_dir():
        raise UserError(f"{hub_id} is no file or folder here, and hub repo {hub_id.repo} is not in the Hugging Face "
                        f"cache at {cache_dir()}, and the hub is off or out of reach",
                        "check the spelling of the path or id, or connect and unset HF_HUB_OFFLINE / DIT_OFFLINE once "
                        "to download it")
    revision = hub_id.revision or "main"
    if not ((root / "refs" / revision).is_file() or (root / "snapshots" / revision).is_dir()):
        refs = {p.name: p.read_text().strip() for p in sorted((root / "refs").glob("*")) if p.is_file()}
        unnamed = [p.name[:12] for p in sorted((root / "snapshots").glob("*")) if p.name not in refs.values()]
        cached = list(refs) + unnamed
        raise UserError(f"revision {revision!r} of hub repo {hub_id.repo} is not in the Hugging Face cache "
                        f"(cached: {', '.join(cached) or 'none'})",
                        "pass a cached revision, or connect and unset HF_HUB_OFFLINE / DIT_OFFLINE to fetch it")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, from one TCP connection; None when it answers or a proxy is set.

    huggingface_hub retries a dead network for about 30 s before giving up; this fails in a moment instead.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError as exc:
        return f"{endpoint.hostname}: {exc.strerror or exc}"
    return None
