"""From `--model`/`--ckpt` to a checkpoint: a registry name, a local file or a hub id, found (rank 0 downloads
first) and read, and checked against the preset asked for. A file found or fetched under a registry name is verified
before it is trusted: it must be that release.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from ditcli.diffusion.objectives import Objective
from ditcli.downloads import ProgressFn, remembered_sha256
from ditcli.errors import UserError
from ditcli.hub import is_offline, resolve_source
from ditcli.io import read_json, safe_torch_load
from ditcli.model.dit import PRESET_SHAPES, DiTConfig, preset_names
from ditcli.weights.checkpoint import load_checkpoint, newest_run_checkpoint
from ditcli.weights.diffusers_format import config_from_diffusers
from ditcli.weights.record import Checkpoint, check_state_dict, describe
from ditcli.weights.registry import (
    KnownWeights,
    known_weights,
    registry_models,
    resolve_weights,
)

DEFAULT_MODEL = "DiT-XL/2"
DownloadProgress = Callable[[str], AbstractContextManager[ProgressFn]] | None
# The fields of a config that the tensors of a release fix (the heads only where its config records them).
RELEASE_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
                  "learn_sigma")


@contextlib.contextmanager
def _no_progress(filename: str):
    yield None


def check_model_choice(model: str | None, image_size: int | None, ckpt: Path | None) -> None:
    """Refuse options that the chosen weights would silently ignore."""
    if ckpt is not None and model in registry_models() and model not in preset_names():
        raise UserError(f"--model {model} names released weights, but --ckpt {ckpt} gives the weights",
                        "drop --model, or drop --ckpt to use the released weights")
    if ckpt is not None and model is not None and model not in preset_names():  # it would be silently ignored
        raise UserError(f"unknown --model {model!r}: with --ckpt it names a preset the file must match",
                        f"choose from {', '.join(preset_names())}, or drop --model")
    if ckpt is None and image_size is not None and model in registry_models() and \
            known_weights(model).image_size is None:
        raise UserError(f"--model {model} comes in one size, so --image-size does not apply", "drop --image-size")


def read_checkpoint(path: Path, model: str | None, weights: str | None,
                    objective: Objective | None = None, decoupled_depth: int | None = None,
                    num_heads: int | None = None) -> Checkpoint:
    """The checkpoint, checked against a --model preset, the --weights, the objective, the decoupled depth and the
    --num-heads asked for (a file whose config records other heads is refused)."""
    # load_checkpoint refuses a missing set of weights, and with heads_given heads that contradict the file's record.
    checkpoint = load_checkpoint(path, num_heads=num_heads if num_heads is not None else preset_heads(model),
                                 weights=weights,
                                 objective=objective, decoupled_depth=decoupled_depth,
                                 heads_given=num_heads is not None)
    check_preset(model, checkpoint)
    return checkpoint


def find_checkpoint(model: str | None, image_size: int | None, ckpt: Path | None, offline: bool,
                    download: DownloadProgress = None) -> tuple[Path, KnownWeights | None]:
    """--ckpt (a path, or a hub id fetched into the Hugging Face cache; a `dit train` run folder gives its newest
    checkpoint) wins; otherwise a known model is found in the weights folders or downloaded, reporting through
    `download(filename)`, a context yielding a byte callback."""
    if ckpt is not None:
        entry = known_weights(model, image_size) if model in registry_models() else None
        path = resolve_source(ckpt, is_offline(offline))
        return newest_run_checkpoint(path) or path, entry
    model = model or DEFAULT_MODEL
    entry = known_weights(model, image_size) if model in registry_models() else None
    if entry is None:
        if model in preset_names():
            raise UserError(f"there are no released weights for {model}", "pass --ckpt with your checkpoint")
        choices = dict.fromkeys(registry_models() + preset_names())
        raise UserError(f"unknown --model {model!r}", f"choose from {', '.join(choices)}")
    with (download or _no_progress)(entry.filename) as progress:
        path = resolve_weights(entry, offline, progress)
    verify_known(entry, path)
    return path, entry


def verify_known(entry: KnownWeights, path: Path) -> None:
    """A file found or fetched under a registry name must be that release, or it is refused rather than sampled under
    the release's name: its size and sha256 where the registry has them (the embedded models), else the keys and
    shapes of its preset (DiT's and SiT's releases, whose hashes are not published), read without loading it twice;
    a hub copy (a diffusers folder) by the config it records."""
    if path.is_file() and entry.size is not None and path.stat().st_size != entry.size:
        raise not_the_release(entry, path, f"it has {path.stat().st_size:,} bytes, the release {entry.size:,}")
    if path.is_file() and entry.sha256 is not None:
        digest = remembered_sha256(path).sha256
        if digest != entry.sha256.lower():
            raise not_the_release(entry, path, f"its sha256 is {digest[:16]}..., the release's {entry.sha256[:16]}...")
        return
    expected = entry.config()
    if expected is None:
        return
    if path.is_dir():
        check_release_config(entry, path, expected)
        return
    try:
        check_state_dict(release_tensors(path), expected, str(path))
    except UserError as exc:
        raise not_the_release(entry, path, exc.what.removeprefix(f"{path} ")) from None


def not_the_release(entry: KnownWeights, path: Path, why: str) -> UserError:
    return UserError(f"{path} is not {entry.model} as released: {why}",
                     f"delete it to fetch the release again, or pass another model with --ckpt {path}")


def release_tensors(path: Path) -> dict:
    """The tensors of a released .pt, memory-mapped (their shapes, without reading gigabytes the load that follows
    reads again); a file that cannot be mapped is read plainly, which says what is wrong with it."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure is reported by the plain load that follows
        data = safe_torch_load(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a state dict", "delete it to fetch the release "
                        "again")
    return data


def check_release_config(entry: KnownWeights, folder: Path, expected: DiTConfig) -> None:
    """A hub copy of a release (a DiTPipeline folder or its transformer) by the config its config.json records."""
    config_file = folder / "transformer" / "config.json"
    config_file = config_file if config_file.is_file() else folder / "config.json"
    stored = config_from_diffusers(read_json(config_file), str(config_file))
    differing = [f"{name} {getattr(stored, name)} (the release's {getattr(expected, name)})"
                 for name in RELEASE_FIELDS if getattr(stored, name) != getattr(expected, name)]
    if differing:
        raise not_the_release(entry, folder, "its config records " + ", ".join(differing))


def model_or_ckpt(source: str | os.PathLike) -> tuple[str | None, Path | None]:
    """A name as `ditcli.load_model` and `ditcli.generate` take it: (--model, None) for a registry name that is no
    local path, else (None, --ckpt) for a file, a run folder, a diffusers folder or a hub id."""
    if str(source) in registry_models() and not Path(source).exists():
        return str(source), None
    return None, Path(source)


def preset_heads(model: str | None) -> int | None:
    return PRESET_SHAPES[model.split("/")[0]]["num_heads"] if model in preset_names() else None


def check_preset(model: str | None, checkpoint: Checkpoint) -> None:
    if model not in preset_names():
        return
    base, patch = model.split("/")
    shape, config = PRESET_SHAPES[base], checkpoint.config
    if (config.depth, config.hidden_size, config.patch_size) != (shape["depth"], shape["hidden_size"], int(patch)):
        raise UserError(f"--model {model} does not match the checkpoint, which holds {describe(config)}",
                        "drop --model or pass the matching preset")
