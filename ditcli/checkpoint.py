"""Reading and writing DiT weights safely: released .pt files, training checkpoints and our .safetensors.

Nothing here runs pickled code: `.pt` files go through `torch.load(weights_only=True)` with one allowed class,
`argparse.Namespace`, which the reference `train.py` stores in its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ditcli.diffusion import BETA_SCHEDULES
from ditcli.ema import EmaRecord
from ditcli.errors import UserError
from ditcli.hub import resolve_source
from ditcli.model import HEADS_BY_WIDTH, PRESET_SHAPES, DiT, DiTConfig, preset
from ditcli.samplers import SamplingDefaults

SAFETENSORS_FORMAT = "ditcli"
TRAIN_FORMAT = "ditcli-train"
WEIGHT_CHOICES = ("ema", "model")


@dataclass
class Checkpoint:
    """Weights plus everything known about them; `build()` gives the model."""

    state_dict: dict[str, torch.Tensor]
    config: DiTConfig
    format: str
    weights: str = "ema"
    class_names: list[str] | None = None
    codec: dict | None = None
    extra: dict = field(default_factory=dict)
    schedule: str = "linear"  # the beta schedule it was trained with; every sampler must use the same
    sampling: SamplingDefaults | None = None  # its own recommended sampler, steps and cfg
    ema: EmaRecord | None = None  # how its EMA was made, when known

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DiT:
        with torch.device("meta"):
            model = DiT(self.config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model = model.to(device)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval().requires_grad_(False)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata that lets one file rebuild this model."""
        data = {"format": SAFETENSORS_FORMAT, "config": json.dumps(self.config.to_dict()), "weights": self.weights}
        if self.class_names is not None:
            data["class_names"] = json.dumps(self.class_names)
        if self.codec is not None:
            data["codec"] = json.dumps(self.codec)
        data["schedule"] = self.schedule
        if self.sampling is not None:
            data["sampling"] = json.dumps(self.sampling.to_dict())
        if self.ema is not None:
            data["ema"] = json.dumps(self.ema.to_dict())
        return data


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu", num_heads: int | None = None,
               config: DiTConfig | None = None, weights: str | None = None) -> DiT:
    """A DiT in eval mode from a released .pt, a training checkpoint or our .safetensors."""
    return load_checkpoint(source, num_heads=num_heads, config=config, weights=weights).build(device)


def load_checkpoint(source: str | os.PathLike, num_heads: int | None = None, config: DiTConfig | None = None,
                    weights: str | None = None) -> Checkpoint:
    """Read any supported weight file, or a hub id (`org/name[@rev]`); `config` (if given) is checked against it.

    `weights` picks the EMA or the raw model weights of a training checkpoint (None: its EMA). A file holding one set
    of weights must hold the set asked for: it is refused rather than silently given in its place.
    """
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise UserError(f"unknown --weights {weights!r}", f"choose from {', '.join(WEIGHT_CHOICES)}")
    if num_heads is not None and num_heads < 1:
        raise UserError(f"--num-heads must be >= 1, got {num_heads}", "drop it to take the heads from the file")
    path = resolve_source(source)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}", "check the path, or pass --model to use a known checkpoint")
    if path.is_dir():
        from ditcli.conversion import read_diffusers

        checkpoint = read_diffusers(path, config=config)
    elif path.stat().st_size == 0:
        raise UserError(f"{path} is empty", "the download or copy was interrupted; fetch the file again")
    elif _is_safetensors(path):
        checkpoint = _read_safetensors(path, num_heads, config)
    else:
        checkpoint = _read_torch(path, num_heads, config, weights or "ema")
    if weights is not None and checkpoint.weights != weights:
        raise UserError(f"--weights {weights}: {path} holds only its {checkpoint.weights} weights",
                        "drop --weights; only training checkpoints hold both ema and model weights")
    return checkpoint


def _is_safetensors(path: Path) -> bool:
    """By name, or by content: a little-endian header length that fits in the file, then the JSON header's '{'."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_safetensors(path: Path, num_heads: int | None, config: DiTConfig | None) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file: {' '.join(str(exc).split())}",
                        "the file is truncated or corrupt; fetch it again") from None
    if "transformer_blocks.0.attn1.to_q.weight" in state:
        from ditcli.conversion import from_diffusers_state, read_diffusers

        if (path.parent / "config.json").is_file():  # inside a transformer/ folder: its config gives the shape
            return read_diffusers(path, config=config)
        return from_diffusers_state(state, config=config, num_heads=num_heads)
    if metadata.get("format") == SAFETENSORS_FORMAT:
        fields = json.loads(metadata["config"])
        stored = DiTConfig.from_dict(fields)
        if config is not None and config != stored:
            raise UserError(f"{path} holds {describe(stored)}, not {describe(config)}", "drop --model or fix it")
        check_state_dict(state, stored, str(path))
        return Checkpoint(state, stored, "safetensors", metadata.get("weights", "ema"),
                          json.loads(metadata["class_names"]) if "class_names" in metadata else None,
                          json.loads(metadata["codec"]) if "codec" in metadata else None,
                          {"convention_source": convention_source(fields)},
                          schedule=read_schedule(metadata.get("schedule"), path),
                          sampling=read_record(metadata.get("sampling"), SamplingDefaults, path, "sampling"),
                          ema=read_record(metadata.get("ema"), EmaRecord, path, "ema"))
    return _from_bare_state(state, "safetensors (no ditcli metadata)", num_heads, config, str(path))


def safe_torch_load(path: str | os.PathLike):
    """torch.load with weights_only=True and only argparse.Namespace allowed; one-line errors otherwise."""
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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.split(". ")[0]  # torch's zip errors go on for several sentences of advice
        raise UserError(f"{path} is not a readable checkpoint: {first}",
                        "the file is truncated or corrupt; fetch it again") from None
    except (IndexError, KeyError, ValueError) as exc:  # the unpickler tripping over random bytes
        raise UserError(f"{path} is not a readable checkpoint: the unpickler failed with {type(exc).__name__}",
                        "the file is corrupt or not a PyTorch weight file; fetch it again") from None


def _read_torch(path: Path, num_heads: int | None, config: DiTConfig | None, weights: str) -> Checkpoint:
    data = safe_torch_load(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a DiT state dict or checkpoint")
    if data.get("format") == TRAIN_FORMAT:
        stored = DiTConfig.from_dict(data["config"]["model"])
        if not isinstance(data.get(weights), dict):
            held = " and ".join(k for k in WEIGHT_CHOICES if isinstance(data.get(k), dict)) or "no"
            raise UserError(f"{path} has no {weights} weights (it holds {held} weights)",
                            f"pass --weights {'model' if weights == 'ema' else 'ema'}" if held != "no" else
                            "the checkpoint is incomplete; use another one")
        state = data[weights]
        check_state_dict(state, stored, str(path))
        train = data["config"].get("train", {})
        ema = EmaRecord(float(train["ema_decay"]), bool(train.get("ema_warmup")), int(data.get("step") or 0)) \
            if "ema_decay" in train else None
        return Checkpoint(state, stored, "ditcli training checkpoint", weights, data.get("class_names"),
                          data.get("codec"), {"step": data.get("step"),
                                              "convention_source": convention_source(data["config"]["model"])},
                          schedule=read_schedule(train.get("schedule"), path),
                          sampling=read_record(data.get("sampling"), SamplingDefaults, path, "sampling"), ema=ema)
    if "model" in data and "args" in data:
        return _from_reference_train(data, weights, num_heads, config, str(path))
    return _from_bare_state(data, "official DiT state dict", num_heads, config, str(path))


def read_schedule(name: str | None, path) -> str:
    """The recorded beta schedule (files from before it was recorded were all trained with linear betas)."""
    if name is None:
        return "linear"
    if name not in BETA_SCHEDULES:
        raise UserError(f"{path} records an unknown beta schedule {name!r}", f"expected {', '.join(BETA_SCHEDULES)}")
    return name


def read_record(value: str | dict | None, kind, path, key: str):
    """A recorded SamplingDefaults or EmaRecord (JSON text in safetensors metadata, a dict in a .pt), or None."""
    try:
        return kind.from_dict(json.loads(value) if isinstance(value, str) else value)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} has an unreadable {key!r} record: {value!r} ({type(exc).__name__}: {exc})",
                        f"fix or drop the {key!r} metadata, or convert the source checkpoint again") from None


def _from_reference_train(data: dict, weights: str, num_heads: int | None, config: DiTConfig | None,
                          name: str) -> Checkpoint:
    """A reference train.py checkpoint: {model, ema, opt, args}; the model name in args gives the heads."""
    args = data["args"]
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    if weights not in data:
        raise UserError(f"{name} has no {weights!r} weights", f"it holds: {', '.join(sorted(data))}")
    if config is None and args.get("model"):
        latent = int(args.get("image_size", 256)) // 8
        num_classes = int(args.get("num_classes", DiTConfig.num_classes))
        config = preset(args["model"], input_size=latent, num_classes=num_classes)
    checkpoint = _from_bare_state(data[weights], "reference train.py checkpoint", num_heads, config, name)
    checkpoint.weights = weights
    checkpoint.codec = {"kind": "vae", "vae": f"stabilityai/sd-vae-ft-{args.get('vae', 'ema')}"}
    return checkpoint


def _from_bare_state(state: dict, fmt: str, num_heads: int | None, config: DiTConfig | None,
                     name: str) -> Checkpoint:
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{name} is not a DiT state dict (it holds non-tensor values)")
    if config is None:
        config = infer_config(state, num_heads, name)
    check_state_dict(state, config, name)
    codec = {"kind": "vae", "vae": "stabilityai/sd-vae-ft-ema"} if config.in_channels == 4 else None
    return Checkpoint(state, config, fmt, "ema", codec=codec,
                      extra={"convention_source": "the reference layout, so the reference's forward"})


def convention_source(fields: dict) -> str:
    """How a stored config tells its timestep convention: recorded, or from before the field (all reference)."""
    if "timestep_convention" in fields:
        return "recorded in the file"
    return "not recorded (written before the field existed, when every model was a reference model)"


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None, name: str = "checkpoint") -> DiTConfig:
    """Read the architecture off the tensor shapes; heads come from the preset table or `num_heads`."""
    needed = ["x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "y_embedder.embedding_table.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{name} is not a DiT checkpoint: missing {', '.join(missing)}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    grid = math.isqrt(state["pos_embed"].shape[1])
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    heads = num_heads or HEADS_BY_WIDTH.get(hidden)
    if num_heads is not None and hidden % num_heads:
        raise UserError(f"--num-heads {num_heads} does not divide the width {hidden} of {name}",
                        "pass a number of heads that divides it")
    if heads is None:
        raise UserError(f"cannot infer the number of attention heads for hidden size {hidden}",
                        "pass num_heads (presets: " + ", ".join(f"{w}->{h}" for w, h in HEADS_BY_WIDTH.items()) + ")")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / hidden if fc1 is not None else 4.0
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    return DiTConfig(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                     depth=max(depth, 1), num_heads=heads, mlp_ratio=mlp_ratio, num_classes=rows - 1,
                     learn_sigma=out_channels == 2 * in_channels, class_dropout_prob=0.1)


def describe(config: DiTConfig) -> str:
    name = next((n for n, s in PRESET_SHAPES.items()
                 if s["depth"] == config.depth and s["hidden_size"] == config.hidden_size), "DiT")
    return f"{name}/{config.patch_size} ({config.depth} blocks, width {config.hidden_size}, input {config.input_size})"


def check_state_dict(state: dict[str, torch.Tensor], config: DiTConfig, name: str = "checkpoint") -> None:
    """Raise one line naming missing or unexpected keys and wrong shapes against `config`."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in DiT(config).state_dict().items()}
    missing = sorted(set(expected) - set(state), key=_natural)
    unexpected = sorted(set(state) - set(expected), key=_natural)
    if missing or unexpected:
        problem = _key_problem(missing, unexpected, state, config)
        raise UserError(f"{name} does not match {describe(config)}: {problem}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise UserError(f"{name} does not match {describe(config)}: {key} has shape {tuple(state[key].shape)}, "
                            f"expected {tuple(shape)}")


def _key_problem(missing: list[str], unexpected: list[str], state: dict, config: DiTConfig) -> str:
    found_blocks = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    parts = []
    for label, keys in (("unexpected", unexpected), ("missing", missing)):
        groups = Counter(re.sub(r"^blocks\.(\d+)\..*", r"blocks.\1.*", k) for k in keys)
        if groups:
            shown = ", ".join(list(groups)[:4]) + (f" and {len(groups) - 4} more" if len(groups) > 4 else "")
            parts.append(f"{label} key{'s' if len(keys) > 1 else ''} {shown}")
    if found_blocks != config.depth:
        parts.append(f"{found_blocks} blocks found, expected {config.depth}")
    return "; ".join(parts)


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def check_creatable(path: Path, flag: str, kind: str = "folder") -> None:
    """Refuse, before any work, a `kind` ("folder" or "file") at `path` that could not be written; creates nothing."""
    path = Path(path).absolute()
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


def atomic_write(path: Path, write, force: bool = False) -> None:
    """Call write(tmp_path), then rename over `path`; an existing file needs `force`."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists", "pass --force to overwrite it")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        apply_umask(Path(tmp), 0o666)
        os.replace(tmp, path)
    except OSError as exc:  # name the user's path, not our temporary file beside it
        raise UserError(f"cannot write {path}: {exc.strerror or type(exc).__name__}",
                        "check the free space and the permissions of its folder") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def apply_umask(path: Path, mode: int) -> None:
    """Give a mkstemp/mkdtemp entry (private: 0600/0700) the permissions a plain open()/mkdir() would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def save_safetensors(checkpoint: Checkpoint, path: Path, dtype: torch.dtype | None = None, force: bool = False):
    """Write weights plus config metadata, atomically."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in checkpoint.state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=checkpoint.metadata()), force=force)
