"""From `--model`/`--ckpt` to a checkpoint: a registry name, a local file or a hub id, found (rank 0 downloads
first) and read, and checked against the preset asked for.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, ContextManager

from ditcli.diffusion.objectives import Objective
from ditcli.downloads import ProgressFn
from ditcli.errors import UserError
from ditcli.hub import is_offline, resolve_source
from ditcli.model.dit import PRESET_SHAPES, preset_names
from ditcli.weights.checkpoint import load_checkpoint, newest_run_checkpoint
from ditcli.weights.record import Checkpoint, describe
from ditcli.weights.registry import (
    KnownWeights,
    known_weights,
    registry_models,
    resolve_weights,
)

DEFAULT_MODEL = "DiT-XL/2"
DownloadProgress = Callable[[str], ContextManager[ProgressFn]] | None


@contextlib.contextmanager
def _no_progress(filename: str):
    yield None


def check_model_choice(model: str | None, image_size: int | None, ckpt: Path | None) -> None:
    """Refuse options that the chosen weights would silently ignore."""
    if ckpt is not None and model in registry_models() and model not in preset_names():
        raise UserError(f"--model {model} names released weights, but --ckpt {ckpt} gives the weights",
                        "drop --model, or drop --ckpt to use the released weights")
    if ckpt is None and image_size is not None and model in registry_models() and \
            known_weights(model).image_size is None:
        raise UserError(f"--model {model} comes in one size, so --image-size does not apply", "drop --image-size")


def read_checkpoint(path: Path, model: str | None, weights: str | None,
                    objective: Objective | None = None, decoupled_depth: int | None = None,
                    num_heads: int | None = None) -> Checkpoint:
    """The checkpoint, checked against a --model preset, the --weights, the objective, the decoupled depth and the
    --num-heads asked for (a file whose config records other heads is refused)."""
    # load_checkpoint refuses a missing set of weights, and with heads_given heads that contradict the file's record.
    checkpoint = load_checkpoint(path, num_heads=num_heads or preset_heads(model), weights=weights,
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
        return resolve_weights(entry, offline, progress), entry


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
