"""A DiT state dict and what is known about it: the `Checkpoint` record, its metadata, and the one key/shape check.

Every reader (ditcli.weights.checkpoint for our files and the reference's, ditcli.weights.diffusers_format for diffusers folders)
fills the same typed record, each of its fields read through ditcli.weights.fields, the one validation of a file's
records. Imports only model, diffusion, ema, samplers and errors.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from ditcli.diffusion.objectives import DDPM, Objective
from ditcli.diffusion.process import Process
from ditcli.diffusion.samplers import SamplingDefaults
from ditcli.errors import UserError
from ditcli.model.dit import PRESET_SHAPES, DiT, DiTConfig
from ditcli.weights.ema import EmaRecord

SAFETENSORS_FORMAT = "ditcli"
BLOCK_KEY = re.compile(r"^(?:transformer_)?blocks\.(\d+)\.")  # ours `blocks.i.`, diffusers' `transformer_blocks.i.`


@dataclass
class Checkpoint:
    """Weights plus everything known about them; `build()` gives the model."""

    state_dict: dict[str, torch.Tensor]
    config: DiTConfig
    format: str
    weights: str = "ema"
    class_names: list[str] | None = None
    codec: dict | None = None
    schedule: str = "linear"  # the beta schedule it was trained with; every sampler must use the same
    objective: Objective = DDPM  # what it predicts and in which time direction (ditcli.diffusion.objectives)
    objective_recorded: bool = False  # whether the file itself records the objective
    flow_hint: str | None = None  # "SiT", "REPA", "MeanFlow", "DMF": from elsewhere, its objective must be named
    dropped: list[str] = field(default_factory=list)  # key groups of the file that the model does not use
    sampling: SamplingDefaults | None = None  # its own recommended sampler, steps and cfg
    ema: EmaRecord | None = None  # how its EMA was made, when known
    step: int | None = None  # the training step it was saved at (training checkpoints)
    convention_source: str | None = None  # how the timestep convention was established, in words
    weights_recorded: bool = False  # whether the file itself says which weights (EMA or not) it holds
    config_recorded: bool = False  # whether the file records its config (heads included), not only tensor shapes
    warnings: list[str] = field(default_factory=list)  # what reading it found, for the caller to show

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DiT:
        with torch.device("meta"):
            model = DiT(self.config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model = model.to(device)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval().requires_grad_(False)

    def process(self) -> Process:
        """The training process it was trained with, the one its samplers run on."""
        return self.objective.process(self.config.learn_sigma, self.schedule)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata that lets one file rebuild this model."""
        data = {"format": SAFETENSORS_FORMAT, "config": json.dumps(self.config.to_dict()), "weights": self.weights}
        if self.class_names is not None:
            data["class_names"] = json.dumps(self.class_names)
        if self.codec is not None:
            data["codec"] = json.dumps(self.codec)
        data["schedule"] = self.schedule
        data.update(self.objective.to_metadata())
        if self.sampling is not None:
            data["sampling"] = json.dumps(self.sampling.to_dict())
        if self.ema is not None:
            data["ema"] = json.dumps(self.ema.to_dict())
        return data


def describe(config: DiTConfig) -> str:
    name = next((n for n, s in PRESET_SHAPES.items()
                 if s["depth"] == config.depth and s["hidden_size"] == config.hidden_size), "DiT")
    return f"{name}/{config.patch_size} ({config.depth} blocks, width {config.hidden_size}, input {config.input_size})"


def form_name(config: DiTConfig) -> str | None:
    """How a mean-flow model sees its second time r: "separate" (MeanFlow) or "decoupled K" (DMF); None without r."""
    if config.mean_flow_form == "decoupled":
        return f"decoupled {config.decoupled_depth}"
    return config.mean_flow_form


def state_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of our DiT of `config` (built on the meta device: no memory, no RNG)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DiT(config).state_dict().items()}


def check_state_dict(state: dict[str, torch.Tensor], config: DiTConfig, name: str = "checkpoint") -> None:
    """Raise one line naming missing or unexpected keys and wrong shapes against our DiT of `config`."""
    check_keys(state, state_shapes(config), f"{name} does not match {describe(config)}", config.depth,
               "its tensors are not those of that model: is the file complete, and is that its config?")


def check_keys(state: dict[str, torch.Tensor], expected: dict[str, tuple], problem: str, depth: int,
               hint: str | None = None) -> None:
    """The one key/shape check: `problem: <missing/unexpected keys, blocks found>` or `problem: <key> has shape`."""
    if not all(isinstance(key, str) for key in state):
        raise UserError(f"{problem}: a key that is no name ({next(k for k in state if not isinstance(k, str))!r})",
                        hint)
    missing = sorted(set(expected) - set(state), key=_natural)
    unexpected = sorted(set(state) - set(expected), key=_natural)
    if missing or unexpected:
        raise UserError(f"{problem}: {_key_problem(missing, unexpected, state, depth)}", hint)
    for key, shape in expected.items():
        if not isinstance(state[key], torch.Tensor):
            raise UserError(f"{problem}: {key} is a {type(state[key]).__name__}, not a tensor", hint)
        if tuple(state[key].shape) != tuple(shape):
            raise UserError(f"{problem}: {key} has shape {tuple(state[key].shape)}, expected {tuple(shape)}", hint)
        if not state[key].is_floating_point():
            raise UserError(f"{problem}: {key} holds {str(state[key].dtype).removeprefix('torch.')} numbers, not "
                            "floating-point weights", hint)


def _key_problem(missing: list[str], unexpected: list[str], state: dict, depth: int) -> str:
    found_blocks = len({m.group(1) for k in state if (m := BLOCK_KEY.match(k))})
    parts = []
    for label, keys in (("unexpected", unexpected), ("missing", missing)):
        per_block = Counter(m.group(0) for k in keys if (m := BLOCK_KEY.match(k)))
        groups = Counter(m.group(0) + "*" if (m := BLOCK_KEY.match(k)) and per_block[m.group(0)] > 1 else k
                         for k in keys)  # a block's keys as `blocks.i.*` where several of them are listed
        if groups:
            shown = ", ".join(list(groups)[:4]) + (f" and {len(groups) - 4} more" if len(groups) > 4 else "")
            parts.append(f"{label} key{'s' if len(keys) > 1 else ''} {shown}")
    if found_blocks != depth:
        parts.append(f"{found_blocks} blocks found, expected {depth}")
    return "; ".join(parts)


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(key))]
