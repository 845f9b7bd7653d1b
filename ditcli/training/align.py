"""Representation alignment while training: REPA (Yu et al., 2025), SRA (Jiang et al., 2025) and the dispersive loss
(Wang & He, 2025), each an extra term on the tokens after one block of the model.

- `--align repa`: block D's tokens go through REPA's MLP projector and are pulled towards a frozen encoder's patch
  tokens of the clean image by a negative cosine (`ditcli.training.encoders`).
- `--align self`: block D's tokens go through a small head and are pulled, by the same negative cosine, towards the
  tokens after a later block of the model's own EMA, run on the same image and noise at a less noisy time.
- `--dispersive`: the tokens after one block of the images of a batch are pushed apart, with no target and no
  parameters (an InfoNCE loss without positive pairs).

The heads are training-only modules. They sit with the DiT in one module (`TapNet`), so DDP synchronises their
gradients and `--compile` traces them with the model; the run's checkpoints hold them, in REPA's key layout
(`projectors.0.0.weight`, ...), with their optimizer state. The plain `DiT.forward` taps nothing: the tapped forward
is `DiT.forward_tokens`, and nothing that samples uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditcli.diffusion.guidance import image_seed
from ditcli.errors import UserError
from ditcli.io import read_safetensors, safe_torch_load
from ditcli.model.dit import DiT, DiTConfig, preset
from ditcli.runtime import autocast
from ditcli.training.encoders import DINOV2, ENCODER_NAMES, load_encoder
from ditcli.weights.checkpoint import (
    REPA_EXTRA_PREFIX,
    TRAIN_FORMAT,
    newest_run_checkpoint,
)

ALIGN_METHODS = ("none", "repa", "self")
REPA_DEPTH = 8  # REPA's encoder_depth for SiT-L/2 and SiT-XL/2, counted from 1 (4 for SiT-B/2: a third of the depth)
REPA_PROJECTOR_DIM = 2048  # REPA's projector_dim
ALIGN_WEIGHT = 0.5  # REPA's proj_coeff; SRA's weight of its cosine loss
SRA_DEPTH = 4  # SRA's block_out_s (student) for SiT-XL/2; its teacher block is twice as deep (block_out_t 8)
SRA_TIME_GAP = 0.2  # SRA's t_max: the teacher's noise level is the student's less up to this much
DISPERSIVE_WEIGHT = 0.5  # lambda of Diffuse and Disperse
DISPERSIVE_TEMPERATURE = 1.0  # tau, on squared distances divided by the feature count as the official code
MAX_PROJECTOR_DIM = 1 << 16
HEADS_STREAM = -(10**12)  # image_seed index of the heads' initial weights: no epoch order reaches it


def default_depth(method: str, depth: int) -> int:
    """The block a method taps in a model of `depth` blocks: REPA's 8 of 28 (a third of the depth, at most 8: 4 of
    12 as REPA's SiT-B), SRA's 4 of 28 (a sixth, at most 4)."""
    share, cap = (3, REPA_DEPTH) if method == "repa" else (6, SRA_DEPTH)
    return min(cap, max(1, depth // share))


def projector(hidden: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's projector (`build_mlp`): Linear(D, P), SiLU, Linear(P, P), SiLU, Linear(P, z); keys 0, 2, 4."""
    return nn.Sequential(nn.Linear(hidden, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


def self_head(hidden: int) -> nn.Sequential:
    """SRA's head (`SimpleHead`): Linear(D, 2D), SiLU, Linear(2D, D); keys 0, 2."""
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))


def negative_cosine(z_tilde: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """REPA's projection loss of each image (Eq. 8 of REPA): -cos(z~_n, z_n) along the features, averaged over the
    tokens n; (N, T, d) twice -> (N,). The batch mean is the training loss's."""
    return -(F.normalize(z_tilde, dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1).mean(dim=-1)


def dispersive_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """The dispersive loss, InfoNCE-L2 form (Eq. 6 of Diffuse and Disperse): log E_ij exp(-||z_i - z_j||^2 / tau) over
    all pairs of the batch, i = j included, on the flattened block outputs; the squared distance is divided by the
    feature count, as in the official code."""
    flat = z.flatten(1)  # (N, d)
    pairs = -torch.pdist(flat).pow(2) / (flat.shape[1] * temperature)  # (N (N - 1) / 2,) the pairs i < j
    logits = torch.cat([pairs, pairs, pairs.new_zeros(flat.shape[0])])  # (N * N,) the full matrix
    return torch.logsumexp(logits, dim=0) - math.log(logits.numel())


@dataclass
class AlignBatch:
    """What a micro-batch gives the terms besides the tapped tokens: its clean images as pixels (uint8, flipped as
    `x_start`), and the draws of its loss; `shift` is the uniform draw of SRA's teacher time."""

    pixels: torch.Tensor
    x_start: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    labels: torch.Tensor
    drop: torch.Tensor
    shift: torch.Tensor


class RepaTerm:
    """REPA: block `depth`'s tokens through the projector, against the encoder's patch tokens of the clean image."""

    metric = "align"

    def __init__(self, depth: int, head: nn.Module, weight: float, encoder, grid: int):
        self.depth, self.head, self.weight, self.encoder, self.grid = depth, head, weight, encoder, grid

    def target(self, batch: AlignBatch) -> torch.Tensor:
        return self.encoder(batch.pixels, self.grid)  # (N, T, z)

    def loss(self, tap: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return negative_cosine(tap, target.float())

    def describe(self) -> str:
        return (f"repa: block {self.depth} -> projector -> {self.encoder.name} tokens ({self.encoder.dim}-d, "
                f"{self.grid}x{self.grid}), weight {self.weight:g}")


class SelfTerm:
    """SRA: block `depth`'s tokens through a small head, against the tokens after block `teacher_depth` of the EMA
    `teacher`, run on the same image, noise and labels at a time up to `gap` less noisy (`Process.less_noisy`)."""

    metric = "align"

    def __init__(self, depth: int, head: nn.Module, weight: float, teacher: DiT, teacher_depth: int, gap: float,
                 process):
        self.depth, self.head, self.weight = depth, head, weight
        self.teacher, self.teacher_depth, self.gap, self.process = teacher, teacher_depth, gap, process

    def target(self, batch: AlignBatch) -> torch.Tensor:
        t = self.process.less_noisy(batch.t, self.gap * batch.shift)  # (N,)
        x_t = self.process.q_sample(batch.x_start, t, batch.noise)
        _, (tokens,) = self.teacher.forward_tokens(x_t, self.process.model_timesteps(t), batch.labels, batch.drop,
                                                   None, (self.teacher_depth,), head=False)
        return tokens  # (N, T, D)

    def loss(self, tap: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return negative_cosine(tap, target.float())

    def describe(self) -> str:
        return (f"self (SRA): block {self.depth} -> head -> EMA block {self.teacher_depth} up to {self.gap:g} less "
                f"noisy, weight {self.weight:g}")


class DispersiveTerm:
    """The dispersive loss on the tokens after block `depth`, over the images of each forward's batch."""

    metric = "dispersive"
    head = None

    def __init__(self, depth: int, weight: float, temperature: float):
        self.depth, self.weight, self.temperature = depth, weight, temperature

    def target(self, batch: AlignBatch) -> None:
        return None

    def loss(self, tap: torch.Tensor, target: None) -> torch.Tensor:
        """The batch's loss as every image's term, so that the images' mean is the loss."""
        return dispersive_loss(tap, self.temperature).expand(tap.shape[0])  # (N,)

    def describe(self) -> str:
        return f"dispersive: block {self.depth}, weight {self.weight:g}, temperature {self.temperature:g}"


class Heads(nn.Module):
    """The trainable heads, in REPA's key layout: `projectors.<i>.<layer>.weight`."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.projectors = nn.ModuleList(heads)


class TapNet(nn.Module):
    """The DiT and the heads as one module, for DDP and `--compile`: the model's output and, per term, the tokens
    after its block, through its head where it has one."""

    def __init__(self, model: DiT, heads: Heads | None, depths: tuple[int, ...], head_index: tuple[int | None, ...]):
        super().__init__()
        self.model, self.heads, self.depths, self.head_index = model, heads, depths, head_index

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor | None = None,
                r: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out, tokens = self.model.forward_tokens(x, t, y, drop_mask, r, self.depths)
        taps = [tap if i is None else self.heads.projectors[i](tap) for tap, i in zip(tokens, self.head_index)]
        return out, taps


class Alignment:
    """A run's alignment terms, their heads and how they join a micro-batch's loss terms."""

    def __init__(self, terms: list, device: torch.device, dtype: torch.dtype, seed: int):
        self.terms, self.device, self.dtype = terms, device, dtype
        heads = [term.head for term in terms if term.head is not None]
        self.heads = init_heads(Heads(heads), seed).to(device) if heads else None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The per-image values each micro-step reports (metrics.jsonl columns), unweighted."""
        return tuple(dict.fromkeys(term.metric for term in self.terms))

    def wrap(self, model: DiT) -> TapNet:
        index, heads = [], 0
        for term in self.terms:
            index.append(None if term.head is None else heads)
            heads += term.head is not None
        return TapNet(model, self.heads, tuple(term.depth for term in self.terms), tuple(index))

    def add(self, terms: dict[str, torch.Tensor], taps: list[torch.Tensor], batch: AlignBatch
            ) -> dict[str, torch.Tensor]:
        """The objective's per-image terms with each alignment term added to "loss" at its weight, and reported under
        its metric; the targets are computed without gradients, in the run's precision."""
        with torch.no_grad(), autocast(self.device, self.dtype):
            targets = [term.target(batch) for term in self.terms]
        loss, added = terms["loss"], {}
        for term, tap, target in zip(self.terms, taps, targets):
            value = term.loss(tap.float(), target)  # (N,)
            loss = loss + term.weight * value
            added[term.metric] = added.get(term.metric, 0) + value.detach()
        return {**terms, **added, "loss": loss}

    def describe(self) -> str:
        return "; ".join(term.describe() for term in self.terms)


@torch.no_grad()
def init_heads(heads: Heads, seed: int) -> Heads:
    """REPA's initialisation of its projectors (its `_basic_init`: Xavier-uniform weights, zero biases), drawn from
    a generator of the run's seed alone."""
    generator = torch.Generator().manual_seed(image_seed(seed, HEADS_STREAM))
    for module in heads.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight, generator=generator)
            nn.init.zeros_(module.bias)
    return heads


def build_alignment(config, model_config: DiTConfig, encoder, teacher: DiT, process, device: torch.device,
                    dtype: torch.dtype) -> Alignment | None:
    """The terms `config` asks for (--align, --dispersive); None for a plain run. `encoder` is --align-encoder's,
    loaded earlier (`ditcli.training.encoders.load_encoder`), and `teacher` the EMA."""
    depth, hidden = model_config.depth, model_config.hidden_size
    terms = []
    if config.align == "repa":
        grid = math.isqrt(model_config.num_patches)
        head = projector(hidden, config.align_projector_dim, encoder.dim)
        terms.append(RepaTerm(config.align_depth or default_depth("repa", depth), head, config.align_weight, encoder,
                              grid))
    elif config.align == "self":
        student = config.align_depth or default_depth("self", depth)
        teacher_depth = config.align_teacher_depth or min(depth, 2 * student)
        terms.append(SelfTerm(student, self_head(hidden), config.align_weight, teacher, teacher_depth,
                              SRA_TIME_GAP, process))
    if config.dispersive:
        terms.append(DispersiveTerm(config.dispersive_depth or depth, config.dispersive_weight,
                                    config.dispersive_temperature))
    return Alignment(terms, device, dtype, config.seed) if terms else None


def source_projectors(source: str, weights: str) -> dict[str, torch.Tensor]:
    """The heads an --init-from source holds, in REPA's key layout: a `dit train` checkpoint's `align` entry, or the
    `projectors.*` tensors of a REPA state dict, train.py checkpoint ({model, ema, opt, args}; its `weights` set) or
    bare .safetensors; {} where there are none (hub ids and diffusers folders never hold any)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = newest_run_checkpoint(path)
    if path is None or not path.is_file():
        return {}
    if path.suffix == ".safetensors":
        state = read_safetensors(path)[0]
    else:
        data = safe_torch_load(path)
        if isinstance(data, dict) and data.get("format") == TRAIN_FORMAT:
            return dict(data.get("align") or {})
        state = data.get(weights, data) if isinstance(data, dict) and "args" in data else data
    if not isinstance(state, dict):
        return {}
    return {k: v for k, v in state.items() if k.startswith(REPA_EXTRA_PREFIX) and isinstance(v, torch.Tensor)}


def adopt_projectors(heads: Heads, found: dict[str, torch.Tensor], source: str) -> str | None:
    """Load the source's heads where they fit this run's (a REPA model's first projector, where it aligned to
    several encoders); the line to show where they do not (they then start fresh), or None."""
    if not found:
        return None
    ours = heads.state_dict()
    found = {k: v for k, v in found.items() if k.startswith("projectors.0.")}
    fits = found.keys() == ours.keys() and all(found[k].shape == ours[k].shape for k in ours)
    if not fits:
        return (f"warning: --init-from {source} holds alignment heads ({len(found)} tensors) that do not fit this "
                "run's (another encoder width, projector width or method): they start fresh")
    heads.load_state_dict({k: v.float() for k, v in found.items()})
    return None


# The options (`dit train` checks them in TrainConfig.__post_init__, before anything is read or written).

# The --align methods each alignment option belongs to; the dispersive loss's options need --dispersive.
ALIGN_OPTIONS = {"align_encoder": ("repa",), "align_projector_dim": ("repa",), "align_teacher_depth": ("self",),
                 "align_depth": ("repa", "self"), "align_weight": ("repa", "self")}
DISPERSIVE_OPTIONS = ("dispersive_depth", "dispersive_weight", "dispersive_temperature")


def check_alignment(config) -> None:
    """--align, --dispersive and their options: the method, the numbers, the blocks against the model's depth, the
    options of another method, and the encoder (its kind is read from the file when the run loads it)."""
    if config.align not in ALIGN_METHODS:
        raise UserError(f"unknown --align {config.align!r}", f"choose from {', '.join(ALIGN_METHODS)}")
    numbers = (("--align-weight", config.align_weight, 0.0), ("--dispersive-weight", config.dispersive_weight, 0.0),
               ("--dispersive-temperature", config.dispersive_temperature, 1e-6))
    for flag, value, low in numbers:
        if not (math.isfinite(value) and low <= value <= 1e6):
            raise UserError(f"{flag} must be a finite number in [{low:g}, 1e6], got {value:g}",
                            f"e.g. {flag} 0.5")
    if not 1 <= config.align_projector_dim <= MAX_PROJECTOR_DIM:
        raise UserError(f"--align-projector-dim must be between 1 and {MAX_PROJECTOR_DIM:,}, got "
                        f"{config.align_projector_dim:,}", "REPA uses 2048")
    defaults = type(config).__dataclass_fields__
    for name, methods in ALIGN_OPTIONS.items():
        if getattr(config, name) != defaults[name].default and config.align not in methods:
            raise UserError(f"--{name.replace('_', '-')} only applies to --align {' or '.join(methods)}",
                            f"add --align {methods[0]}, or drop --{name.replace('_', '-')}")
    for name in DISPERSIVE_OPTIONS:
        if getattr(config, name) != defaults[name].default and not config.dispersive:
            raise UserError(f"--{name.replace('_', '-')} only applies with --dispersive",
                            f"add --dispersive, or drop --{name.replace('_', '-')}")
    check_align_blocks(config)
    check_encoder(config)


def check_align_blocks(config) -> None:
    """Every block named must be one of the model's, and SRA's teacher block no earlier than its student."""
    depth = config.depth or preset(config.model).depth
    for flag, block in (("--align-depth", config.align_depth), ("--align-teacher-depth", config.align_teacher_depth),
                        ("--dispersive-depth", config.dispersive_depth)):
        if block is not None and not 1 <= block <= depth:
            raise UserError(f"{flag} {block} is not a block of the model, whose depth is {depth}",
                            f"pass a block from 1 to {depth}, counted from the input (REPA aligns block 8 of 28)")
    student = config.align_depth or default_depth("self", depth)
    if config.align_teacher_depth is not None and config.align_teacher_depth < student:
        raise UserError(f"--align-teacher-depth {config.align_teacher_depth} is before the student's block {student} "
                        "(--align-depth): SRA aligns an early block to a later one", "pass a later block")


def check_encoder(config) -> None:
    """--align repa needs an encoder that exists; --dinov2-weights needs a use and, as a path, a file."""
    encoder = config.align_encoder
    if config.align == "repa" and not encoder:
        raise UserError("--align repa needs an encoder", f"pass --align-encoder {' or '.join(ENCODER_NAMES)} or a "
                        "weight file of either; --align self and --dispersive need none")
    if encoder and encoder not in ENCODER_NAMES and not Path(encoder).expanduser().is_file():
        raise UserError(f"--align-encoder {encoder} is neither {' nor '.join(ENCODER_NAMES)} nor an existing file",
                        "pass a DINOv2 or fashion-judge weight file that exists")
    weights = config.dinov2_weights
    if weights is None:
        return
    if DINOV2 not in (encoder, config.eval_features):
        raise UserError("--dinov2-weights only applies to --align-encoder dinov2 and --eval-features dinov2",
                        "drop --dinov2-weights, or pass one of those")
    if not weights.startswith(("http://", "https://")) and not Path(weights).expanduser().is_file():
        raise UserError(f"--dinov2-weights {weights} not found", "pass an existing torch-hub dinov2_vit*14 file or a "
                        "URL")


def align_encoder(config, device: torch.device):
    """--align repa's encoder, loaded (its file's kind checked) before the run writes anything; None otherwise."""
    return load_encoder(config.align_encoder, config.dinov2_weights, device) if config.align == "repa" else None


def load_heads(heads: Heads, state: dict[str, torch.Tensor] | None, path) -> None:
    """A checkpoint's heads into this run's; a checkpoint without any (resumed with --force) leaves them fresh."""
    if not state:
        return
    ours = heads.state_dict()
    if state.keys() != ours.keys() or any(state[k].shape != ours[k].shape for k in ours):
        raise UserError(f"the alignment heads in {path} do not fit this run's (another encoder, projector width or "
                        "method)", "resume with the run's own --align settings and encoder")
    heads.load_state_dict(state)
