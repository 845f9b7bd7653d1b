"""Reading and writing DiT weights safely: released .pt files, training checkpoints and our .safetensors.

Nothing here runs pickled code: `.pt` files go through `torch.load(weights_only=True)` with one allowed class,
`argparse.Namespace`, which the reference `train.py` stores in its checkpoints.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ditcli.diffusion.objectives import Objective
from ditcli.errors import UserError, UserValueError
from ditcli.hub import resolve_source
from ditcli.io import atomic_write, read_safetensors, safe_torch_load
from ditcli.model.codec import (
    DEFAULT_VAE,
    LATENT_DOWNSAMPLE,
    VAE_ALIASES,
    default_codec_spec,
)
from ditcli.model.dit import (
    HEADS_BY_WIDTH,
    MAX_DEPTH,
    MAX_IMAGE_SIZE,
    DiT,
    DiTConfig,
    preset,
)
from ditcli.weights.diffusers_format import from_diffusers_state, read_diffusers
from ditcli.weights.ema import EmaRecord
from ditcli.weights.fields import (
    EMA_FIELDS,
    MAX_CLASSES,
    WEIGHT_CHOICES,
    Field,
    as_object,
    check_defaults_fit,
    read_choice,
    read_class_names,
    read_codec,
    read_config,
    read_ema,
    read_fields,
    read_object,
    read_objective,
    read_sampling,
    read_schedule,
    read_step,
    read_value,
    refuse,
)
from ditcli.weights.record import (
    SAFETENSORS_FORMAT,
    Checkpoint,
    check_state_dict,
    describe,
    form_name,
)

TRAIN_FORMAT = "ditcli-train"
FLOW_HINTS = {"SiT": "pass --objective flow --time-direction noise-to-data, as SiT trains",
              "REPA": "pass --objective flow --time-direction data-to-noise, as REPA trains",
              "MeanFlow": "pass --objective meanflow --time-direction data-to-noise, as the MeanFlow port trains",
              "DMF": "pass --objective meanflow --time-direction data-to-noise --decoupled-depth K, as DMF trains; "
                     "blocks[:K] see t"}
MEAN_FLOW_FAMILIES = ("MeanFlow", "DMF")  # the flow hints of mean-flow models
SIT_RELEASE_NAME = re.compile(r"^sit[-_]", re.IGNORECASE)  # SiT-XL-2-256x256.pt, as SiT's download.py names it
REPA_EXTRA_PREFIX = "projectors."  # REPA's alignment heads: training only, dropped on reading
DMF_EXTRA_PREFIX = "logvar_linear."  # DMF's learned log-variance of its loss weight: training only, dropped on reading
# Key groups that other codes train and sampling never uses: prefix -> (the family it marks, what it is).
TRAINING_EXTRAS = {REPA_EXTRA_PREFIX: ("REPA", "REPA's representation-alignment projectors"),
                   DMF_EXTRA_PREFIX: ("DMF", "DMF's learned log-variance of its adaptive loss weight")}
SEPARATE_FORM_PREFIX = "r_embedder."  # MeanFlow's embedder of t - r, as the PyTorch port names it
RUN_CHECKPOINT = re.compile(r"ckpt-(\d+)\.pt")  # a `dit train` run folder's checkpoints: ckpt-0001000.pt is step 1000
# The tensors whose shapes give a bare state dict's config, and their dimensions.
SHAPE_KEYS = {"x_embedder.proj.weight": 4, "pos_embed": 3, "final_layer.linear.weight": 2,
              "y_embedder.embedding_table.weight": 2}
# The fields of an objective record (their values are checked by objective_from_record).
OBJECTIVE_FIELDS = {name: Field(object, required=False, nullable=True)
                    for name in ("objective", "time_direction", "trained_cfg")}
# The arguments of a reference train.py checkpoint that reading it uses (the others are left alone).
REFERENCE_ARGS = {"model": Field(str, required=False), "image_size": Field(int, LATENT_DOWNSAMPLE, MAX_IMAGE_SIZE,
                                                                          required=False),
                  "num_classes": Field(int, 0, MAX_CLASSES, required=False), "vae": Field(str, required=False)}


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu", num_heads: int | None = None,
               config: DiTConfig | None = None, weights: str | None = None,
               objective: Objective | None = None, decoupled_depth: int | None = None) -> DiT:
    """A DiT in eval mode from a released .pt, a training checkpoint or our .safetensors."""
    return load_checkpoint(source, num_heads=num_heads, config=config, weights=weights,
                           objective=objective, decoupled_depth=decoupled_depth).build(device)


def load_checkpoint(source: str | os.PathLike, num_heads: int | None = None, config: DiTConfig | None = None,
                    weights: str | None = None, objective: Objective | None = None,
                    heads_given: bool = False, decoupled_depth: int | None = None,
                    weights_flag: str = "--weights") -> Checkpoint:
    """Read any supported weight file, or a hub id (`org/name[@rev]`); `config` (if given) is checked against it.

    `weights` picks the EMA or the raw model weights of a training checkpoint (None: its EMA). A file holding one set
    of weights must hold the set asked for: it is refused rather than silently given in its place. `objective` says
    what a file without a record was trained with (a SiT or REPA checkpoint); a file with a record must agree.
    `num_heads` gives the heads of a file that does not record them (a bare state dict). With `heads_given` it is the
    user's own --num-heads, and a file whose config records other heads is refused; without, it is a caller's guess
    (a preset's heads), and a file's record wins. `decoupled_depth` is a Decoupled MeanFlow file's K (blocks[:K] see
    t), which its tensors cannot tell: it replaces the form of a file that does not record one (`settle_form`).
    `weights_flag` is the option that asked for `weights` (`dit train` names it --init-weights).
    """
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise UserError(f"unknown --weights {weights!r}", f"choose from {', '.join(WEIGHT_CHOICES)}")
    if num_heads is not None and num_heads < 1:
        raise UserError(f"--num-heads must be >= 1, got {num_heads}", "drop it to take the heads from the file")
    path = resolve_source(source)
    checkpoint = _read_any(path, num_heads, config, weights)
    if weights is not None and checkpoint.weights != weights:
        raise UserError(f"{weights_flag} {weights}: {path} holds only its {checkpoint.weights} weights",
                        f"drop {weights_flag}; only training checkpoints hold both ema and model weights")
    if heads_given:
        check_recorded_heads(checkpoint, num_heads, path)
    checkpoint = settle_form(settle_objective(checkpoint, objective, path), decoupled_depth, path)
    check_form_fits(checkpoint, path, decoupled_depth is not None)
    check_defaults_fit(checkpoint.sampling, checkpoint.objective, checkpoint.config, checkpoint.schedule,
                       f"{path} records")
    return checkpoint


def newest_run_checkpoint(path: Path) -> Path | None:
    """The newest `ckpt-<step>.pt` (by step) of a `dit train` run folder; None for anything else, a diffusers folder
    included."""
    if not path.is_dir() or any((path / name).is_file() for name in ("model_index.json", "config.json")):
        return None
    found = [(int(m.group(1)), p) for p in path.glob("ckpt-*.pt") if (m := RUN_CHECKPOINT.fullmatch(p.name))]
    return max(found)[1] if found else None


def _read_any(path: Path, num_heads: int | None, config: DiTConfig | None, weights: str | None) -> Checkpoint:
    """The reader for what `path` is: a `dit train` run folder (its newest checkpoint), a diffusers folder, a
    safetensors file or a torch file."""
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}", "check the path; a hub id is written org/name")
    if path.is_dir():
        newest = newest_run_checkpoint(path)
        return read_diffusers(path, config=config) if newest is None else _read_torch(newest, num_heads, config,
                                                                                       weights or "ema")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty", "the download or copy was interrupted; fetch the file again")
    if _is_safetensors(path):
        return _read_safetensors(path, num_heads, config)
    return _read_torch(path, num_heads, config, weights or "ema")


def check_recorded_heads(checkpoint: Checkpoint, num_heads: int | None, path: Path) -> None:
    """The user's --num-heads against a file whose config records the heads: the same number passes, another is
    refused (the file's config would silently win over it)."""
    recorded = checkpoint.config.num_heads
    if num_heads is not None and checkpoint.config_recorded and num_heads != recorded:
        raise UserError(f"--num-heads {num_heads} contradicts {path}, whose config records num_heads {recorded}",
                        "drop --num-heads: the file's own config gives the heads")


def settle_objective(checkpoint: Checkpoint, given: Objective | None, path: Path) -> Checkpoint:
    """The objective a file records, the one the user names for a file without a record, or DDPM (DiT's).

    A file from SiT, REPA, the MeanFlow port or DMF (`flow_hint` set by its reader) has no record, and its time
    direction cannot be read from the tensors: without `--objective`/`--time-direction` it is refused rather than
    sampled the wrong way.
    """
    if checkpoint.objective_recorded:
        if given is not None and not agrees(given, checkpoint.objective):
            raise UserError(f"{path} records the objective {checkpoint.objective.describe()}, not "
                            f"{given.describe()}", "drop --objective/--time-direction: the file's record decides")
        return checkpoint
    if given is not None:
        checkpoint.objective = given
    elif checkpoint.flow_hint is not None:
        kind = "a mean-flow model" if checkpoint.flow_hint in MEAN_FLOW_FAMILIES else "a flow-matching model"
        raise UserError(f"{path} is a {checkpoint.flow_hint} checkpoint, {kind} whose time direction the file does "
                        "not record", FLOW_HINTS[checkpoint.flow_hint])
    return checkpoint


def agrees(given: Objective, recorded: Objective) -> bool:
    """--objective/--time-direction against a file's record: the same kind in the same time (a trained guidance scale
    is no option); a flow objective, which a lone --time-direction means, also agrees with a mean-flow record of its
    time, since a mean-flow model samples as a flow too."""
    same_time = getattr(given, "time_direction", None) == getattr(recorded, "time_direction", None)
    return same_time and (given.name == recorded.name or (given.name, recorded.name) == ("flow", "meanflow"))


def settle_form(checkpoint: Checkpoint, decoupled_depth: int | None, path: Path) -> Checkpoint:
    """A mean-flow model's form as the file records it or its keys show it (MeanFlow's `r_embedder.*`), or DMF's
    decoupled blocks at the user's --decoupled-depth: DMF adds no weights, so its tensors cannot tell the depth.

    A file with DMF's training-only keys and no depth is refused rather than sampled as a form it is not; a depth that
    contradicts a form the file records or shows is refused rather than ignored.
    """
    config = checkpoint.config
    if decoupled_depth is None:
        if checkpoint.flow_hint == "DMF":
            raise UserError(f"{path} is a DMF checkpoint, whose decoupled depth (how many blocks see t) the file does "
                            "not record", "pass --decoupled-depth K as it was trained; DMF-XL/2 uses 20 of 28")
        return checkpoint
    if checkpoint.objective_recorded or config.mean_flow_form is not None:  # our files record the config's form
        if config.decoupled_depth != decoupled_depth:
            raise UserError(f"--decoupled-depth {decoupled_depth} contradicts {path}, {held_form(checkpoint)}",
                            "drop --decoupled-depth: the file decides")
        return checkpoint
    if not 1 <= decoupled_depth <= config.depth:
        raise UserError(f"--decoupled-depth {decoupled_depth} is not in [1, {config.depth}], the depth of {path}",
                        "pass the number of blocks that see t, as the model was trained")
    checkpoint.config = replace(config, mean_flow_form="decoupled", decoupled_depth=decoupled_depth)
    return checkpoint


def held_form(checkpoint: Checkpoint) -> str:
    """The form a file records or its keys show, as a clause."""
    config = checkpoint.config
    if config.mean_flow_form == "decoupled":
        return f"which records decoupled depth {config.decoupled_depth}"
    if config.mean_flow_form == "separate":
        how = "records" if checkpoint.objective_recorded else f"holds, in its {SEPARATE_FORM_PREFIX}* keys,"
        return f"which {how} MeanFlow's separate embedder of t - r, not DMF's decoupled blocks"
    return "whose config records no second time input (it is not a mean-flow model)"


def check_form_fits(checkpoint: Checkpoint, path: Path, depth_given: bool) -> None:
    """The objective against the network: a mean-flow objective needs a second time input, and a network with one
    samples only as a mean-flow model."""
    config, objective = checkpoint.config, checkpoint.objective
    if bool(objective.architecture(config.decoupled_depth)) == (config.mean_flow_form is not None):
        return
    if config.mean_flow_form is None:
        raise UserError(f"{path} has no second time input (no {SEPARATE_FORM_PREFIX}* keys, no decoupled depth), so "
                        f"it is not {objective.noun()}",
                        "pass --decoupled-depth K for a Decoupled MeanFlow model, or --objective flow")
    raise UserError(f"{path} holds a mean-flow model ({form_name(config)} form), not {objective.noun()}",
                    "pass --objective meanflow with its --time-direction"
                    + (", or drop --decoupled-depth" if depth_given else ""))


def _is_safetensors(path: Path) -> bool:
    """By name, or by content: a little-endian header length that fits in the file, then the JSON header's '{'."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_safetensors(path: Path, num_heads: int | None, config: DiTConfig | None) -> Checkpoint:
    state, metadata = read_safetensors(path)
    if "transformer_blocks.0.attn1.to_q.weight" in state:
        if (path.parent / "config.json").is_file():  # inside a transformer/ folder: its config gives the shape
            return read_diffusers(path, config=config)
        return from_diffusers_state(state, config=config, num_heads=num_heads)
    if metadata.get("format") == SAFETENSORS_FORMAT:
        return _from_metadata(state, metadata, path, config)
    return _from_bare_state(state, "safetensors (no ditcli metadata)", num_heads, config, str(path))


def _from_metadata(state: dict, metadata: dict[str, str], path: Path, config: DiTConfig | None) -> Checkpoint:
    """Our .safetensors: every record of its metadata through the one validation (ditcli.weights.fields), then its
    tensors against its config."""
    if "config" not in metadata:
        raise UserError(f"{path} is a ditcli file without its config record", "convert the source checkpoint again")
    fields = as_object(metadata["config"], path, "model config")
    stored = read_config(fields, path)
    if config is not None and config != stored:
        raise UserError(f"{path} holds {describe(stored)}, not {describe(config)}", "drop --model or fix it")
    check_state_dict(state, stored, str(path))
    return Checkpoint(state, stored, "safetensors",
                      read_choice(metadata.get("weights"), WEIGHT_CHOICES, path, "weights", "ema"),
                      read_class_names(metadata.get("class_names"), path, stored.num_classes),
                      read_codec(metadata.get("codec"), path),
                      schedule=read_schedule(metadata.get("schedule"), path),
                      objective=read_objective(metadata, path), objective_recorded=True,
                      sampling=read_sampling(metadata.get("sampling"), path),
                      ema=read_ema(metadata.get("ema"), path),
                      convention_source=convention_source(fields), weights_recorded=True, config_recorded=True)


def _read_torch(path: Path, num_heads: int | None, config: DiTConfig | None, weights: str) -> Checkpoint:
    data = safe_torch_load(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a DiT state dict or checkpoint")
    if data.get("format") == TRAIN_FORMAT:
        return _from_train_checkpoint(data, path, weights)
    if "model" in data and "args" in data:
        return _from_reference_train(data, weights, num_heads, config, str(path))
    checkpoint = _from_bare_state(data, "official DiT state dict", num_heads, config, str(path))
    if checkpoint.flow_hint is None and SIT_RELEASE_NAME.match(path.name):
        checkpoint.flow_hint = "SiT"  # SiT's release has DiT's exact layout; only its name tells them apart
    return checkpoint


def _from_train_checkpoint(data: dict, path: Path, weights: str) -> Checkpoint:
    """A `dit train` checkpoint: its records (config, codec, class names, schedule, objective, sampling defaults, EMA
    record, step) through the one validation, then the weights asked for against its config."""
    records = as_object(data.get("config"), path, "config record")
    stored = read_config(records.get("model"), path, "model config (config.model)")
    train = read_object(records.get("train"), path, "config.train record") or {}
    if not isinstance(data.get(weights), dict):
        held = " and ".join(k for k in WEIGHT_CHOICES if isinstance(data.get(k), dict)) or "no"
        raise UserError(f"{path} has no {weights} weights (it holds {held} weights)",
                        f"pass --weights {'model' if weights == 'ema' else 'ema'}" if held != "no" else
                        "the checkpoint is incomplete; use another one")
    state = data[weights]
    check_state_dict(state, stored, str(path))
    return Checkpoint(state, stored, "ditcli training checkpoint", weights,
                      read_class_names(data.get("class_names"), path, stored.num_classes),
                      read_codec(data.get("codec"), path),
                      schedule=read_schedule(train.get("schedule"), path, "config.train.schedule"),
                      objective=train_objective(data.get("objective"), train, path), objective_recorded=True,
                      sampling=read_sampling(data.get("sampling"), path), ema=train_ema_record(data, path),
                      step=read_step(data.get("step"), path), convention_source=convention_source(records["model"]),
                      weights_recorded=True, config_recorded=True, dropped=train_extras(data))


def read_train_records(data: dict, path: Path) -> Checkpoint:
    """A `dit train` checkpoint's records and EMA weights as every reader reads them, its sampling defaults against its
    model included: what `--resume` checks before it takes the run up again, so that it continues no checkpoint that
    `dit sample` would refuse."""
    checkpoint = _from_train_checkpoint(data, path, "ema")
    check_defaults_fit(checkpoint.sampling, checkpoint.objective, checkpoint.config, checkpoint.schedule,
                       f"{path} records")
    return checkpoint


def train_extras(data: dict) -> list[str]:
    """What a `dit train` checkpoint keeps beside its weights for training only, as `dropped` reports it: the
    representation-alignment heads of its `align` entry (REPA's `projectors.*` layout)."""
    heads = data.get("align")
    if not isinstance(heads, dict) or not heads:
        return []
    what = "the run's representation-alignment heads, used only in training"
    return [f"{REPA_EXTRA_PREFIX}* ({len(heads)} tensors: {what})"]


def train_objective(record, train: dict, path: Path) -> Objective:
    """A training checkpoint's objective: its own record, which holds nothing else, or (files from before it) its
    train settings'."""
    if record is None or record == {}:  # 0 or [] is no record of an objective, but a bad one
        return read_objective(train, path, "config.train record", older=True)
    read_fields(record, OBJECTIVE_FIELDS, path, "objective record")
    return read_objective(record, path, "objective record")


def train_ema_record(data: dict, path="the training checkpoint") -> EmaRecord | None:
    """How a training checkpoint's EMA was made: its own record, else (files from before it) its training config's,
    where a run with `init_from` started its EMA from the source."""
    if data.get("ema_record") not in (None, {}):  # 0 or [] is no record of an EMA, but a bad one
        return read_ema(data["ema_record"], path, "ema_record record")
    records = as_object(data.get("config"), path, "config record")
    train = read_object(records.get("train"), path, "config.train record") or {}
    if "ema_decay" not in train:
        return None
    decay = read_value(train["ema_decay"], EMA_FIELDS["decay"], path, "config.train record", "ema_decay")
    return EmaRecord(decay, bool(train.get("ema_warmup")), read_step(data.get("step"), path) or 0,
                     bool(train.get("init_from")))


def _from_reference_train(data: dict, weights: str, num_heads: int | None, config: DiTConfig | None,
                          name: str) -> Checkpoint:
    """A reference train.py checkpoint: {model, ema, opt, args}; the model name in args gives the heads."""
    args = data["args"]
    args = vars(args) if isinstance(args, argparse.Namespace) else as_object(args, name, "args record")
    values = read_fields(args, REFERENCE_ARGS, name, "args record", strict=False)
    if weights not in data or not isinstance(data[weights], dict):
        raise UserError(f"{name} has no {weights!r} weights", f"it holds: {', '.join(sorted(map(str, data)))}")
    family = flow_family(args, data[weights])
    named = config is None and bool(values.get("model")) and family is None  # args.model records the config
    if named:
        config = reference_config(values, name)
    fmt = f"{family} train.py checkpoint" if family else "reference train.py checkpoint"
    checkpoint = _from_bare_state(data[weights], fmt, num_heads, config, name)
    checkpoint.config_recorded = named
    checkpoint.flow_hint = checkpoint.flow_hint or family  # the keys' family (MeanFlow, DMF) over the arguments'
    checkpoint.weights = weights
    checkpoint.weights_recorded = True
    checkpoint.codec = {"kind": "vae", "vae": VAE_ALIASES.get(values.get("vae", "ema"), DEFAULT_VAE)}
    return checkpoint


def _from_bare_state(state: dict, fmt: str, num_heads: int | None, config: DiTConfig | None,
                     name: str) -> Checkpoint:
    """A plain state dict: the config from its shapes (or `config`), other codes' training-only keys dropped and
    reported, and the family those keys or MeanFlow's `r_embedder.*` mark, whose objective must be named."""
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{name} is not a DiT state dict (it holds non-tensor values)")
    extras = {prefix: sorted(k for k in state if k.startswith(prefix)) for prefix in TRAINING_EXTRAS}
    state = {k: v for k, v in state.items() if not k.startswith(tuple(TRAINING_EXTRAS))}
    if config is None:
        config = infer_config(state, num_heads, name)
    check_state_dict(state, config, name)
    checkpoint = Checkpoint(state, config, fmt, "ema", codec=default_codec_spec(config.in_channels),
                            convention_source="the reference layout, so the reference's forward")
    if config.mean_flow_form == "separate":
        checkpoint.flow_hint = "MeanFlow"
    for prefix, keys in extras.items():
        if keys:
            checkpoint.flow_hint, what = TRAINING_EXTRAS[prefix]
            checkpoint.dropped.append(f"{prefix}* ({len(keys)} tensors: {what}, used only in training)")
    return checkpoint


def reference_config(args: dict, name: str) -> DiTConfig:
    """The preset a reference train.py run names in its arguments, at their image size and class count."""
    try:
        return preset(args["model"], input_size=args.get("image_size", 256) // LATENT_DOWNSAMPLE,
                      num_classes=args.get("num_classes", DiTConfig.num_classes))
    except UserValueError as exc:
        raise refuse(name, "args record", exc.what) from None


def flow_family(args: dict, state: dict) -> str | None:
    """"SiT" or "REPA" when a train.py checkpoint's arguments (or REPA's projector keys) name one; None for DiT."""
    if any(k.startswith(REPA_EXTRA_PREFIX) for k in state) or {"enc_type", "proj_coeff"} & set(args):
        return "REPA"
    if str(args.get("model", "")).startswith("SiT"):
        return "SiT"
    return None


def convention_source(fields: dict) -> str:
    """How a stored config tells its timestep convention: recorded, or from before the field (all reference)."""
    if "timestep_convention" in fields:
        return "recorded in the file"
    return "not recorded (written before the field existed, when every model was a reference model)"


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None, name: str = "checkpoint") -> DiTConfig:
    """Read the architecture off the tensor shapes; heads come from the preset table or `num_heads`. MeanFlow's
    `r_embedder.*` gives its separate form; DMF's decoupled depth leaves no trace in the tensors (`settle_form`)."""
    missing = [k for k in SHAPE_KEYS if k not in state]
    if missing:
        raise UserError(f"{name} is not a DiT checkpoint: missing {', '.join(missing)}",
                        "pass a DiT's weights: a released .pt, a dit train checkpoint, a .safetensors or a diffusers "
                        "folder")
    for key, dims in SHAPE_KEYS.items():
        if state[key].dim() != dims or 0 in state[key].shape:
            raise UserError(f"{name} is not a DiT checkpoint: {key} has shape {tuple(state[key].shape)}",
                            f"a DiT's {key} has {dims} dimensions, none of them 0")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    grid = math.isqrt(state["pos_embed"].shape[1])
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth > MAX_DEPTH:
        raise UserError(f"{name} has a key of block {depth - 1}, past the largest depth {MAX_DEPTH}",
                        "pass a DiT's weights; its blocks are numbered from 0")
    heads = num_heads or HEADS_BY_WIDTH.get(hidden)
    if num_heads is not None and hidden % num_heads:
        raise UserError(f"--num-heads {num_heads} does not divide the width {hidden} of {name}",
                        "pass a number of heads that divides it")
    if heads is None:
        raise UserError(f"cannot infer the number of attention heads for hidden size {hidden}",
                        "pass --num-heads (num_heads in Python); the presets have " +
                        ", ".join(f"{w}->{h}" for w, h in HEADS_BY_WIDTH.items()))
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / hidden if fc1 is not None else 4.0
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    form = {"mean_flow_form": "separate"} if any(k.startswith(SEPARATE_FORM_PREFIX) for k in state) else {}
    try:
        return DiTConfig(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                         depth=max(depth, 1), num_heads=heads, mlp_ratio=mlp_ratio, num_classes=rows - 1,
                         learn_sigma=out_channels == 2 * in_channels, **form)
    except UserValueError as exc:
        raise UserError(f"{name} holds no DiT its shapes describe: {exc.what}",
                        "pass a DiT's weights, with --num-heads where its width is no preset's") from None


def save_safetensors(checkpoint: Checkpoint, path: Path, dtype: torch.dtype | None = None, force: bool = False):
    """Write weights plus config metadata, atomically."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in checkpoint.state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=checkpoint.metadata()), force=force)
