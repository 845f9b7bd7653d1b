"""`dit train --init-from SRC`: start a run from another DiT's weights instead of a fresh initialisation.

SRC is anything `load_checkpoint` reads (a released .pt, our .safetensors, a `dit train` or reference `train.py`
checkpoint, a diffusers folder, a hub id). The architecture must match the model being trained. The image size may
differ: the fixed sin-cos `pos_embed` is rebuilt for the new grid. The class count may differ: label rows are carried
over by class name when both sides have names (a 1000-class source without names is ImageNet-1k), else by id over the
shared range; the others keep the fresh model's initialisation, and the source's null row becomes the new null row.
Unless `--init-weights` says which, the source's EMA is read, or its raw model weights where its EMA record says the
EMA is still mostly the initial weights (a short run at DiT's decay 0.9999) and the source holds both sets.
A source whose file records another objective than the run's (a DDPM model fine-tuned as a flow, say) is allowed
with a warning; a flow source whose time runs the other way is refused, since its velocity has the opposite sign.
Nothing here prints; `InitFrom.summary()` says what happened, for the start-up table, and `InitFrom.notes` are the
lines to show before training (a stale EMA, a change of objective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ditcli.data.classes import IMAGENET_CLASSES, ClassTable, class_table, normalize
from ditcli.diffusion.objectives import DDPM, FlowObjective, Objective
from ditcli.errors import UserError
from ditcli.hub import parse_hub_id
from ditcli.model.codec import LATENT_CHANNELS
from ditcli.model.dit import HEADS_BY_WIDTH, PRESET_SHAPES, DiT, DiTConfig
from ditcli.weights.checkpoint import load_checkpoint
from ditcli.weights.ema import EmaRecord
from ditcli.weights.record import Checkpoint, describe

LABEL_TABLE = "y_embedder.embedding_table.weight"
# (DiTConfig field, what the error calls it): what must agree between the source and the model being trained.
ARCHITECTURE = (("patch_size", "patch"), ("hidden_size", "width"), ("depth", "depth"), ("num_heads", "heads"),
                ("in_channels", "channels"), ("learn_sigma", "learn_sigma"), ("mlp_ratio", "mlp ratio"))


@dataclass(frozen=True)
class LabelPlan:
    """Which source label row each new class takes (None: fresh), and how the pairs were found."""

    rows: tuple[int | None, ...]
    matched_by: str
    null_row: str  # "copied", "fresh" (the source has none) or "none" (the new model has none)

    @property
    def copied(self) -> int:
        return sum(row is not None for row in self.rows)


@dataclass(frozen=True)
class InitFrom:
    """The source's weights mapped onto the model to train, and what the mapping did."""

    source: str
    format: str
    weights: str
    config: DiTConfig  # the model to train, running the source's forward convention
    state_dict: dict[str, torch.Tensor]
    labels: LabelPlan
    source_grid: int
    stale_ema: EmaRecord | None = None  # the source's EMA record, when it says the EMA is mostly initial weights
    notes: tuple[str, ...] = ()  # on the weights chosen over, or kept despite, a stale EMA; on a change of objective

    def summary(self) -> dict[str, str]:
        """Rows of the training start-up table."""
        grid, old = math.isqrt(self.config.num_patches), self.source_grid
        pos = "kept" if grid == old else f"rebuilt for {grid}x{grid} (source {old}x{old})"
        fresh = len(self.labels.rows) - self.labels.copied
        by = f" by {self.labels.matched_by}" if self.labels.copied else ""
        stale = ""
        if self.stale_ema is not None:
            share = f"{self.stale_ema.start_share:.0%} initial weights"
            stale = f": its EMA is {share}" if self.weights == "model" else f", {share}"
        return {"init_from": f"{self.source} ({self.format}, {self.weights} weights{stale})",
                "label_rows": f"{self.labels.copied} copied{by}, {fresh} fresh, null row {self.labels.null_row}",
                "pos_embed": pos, "timestep_convention": self.config.timestep_convention}

SECOND_TIME_EMBEDDER = "r_embedder."  # MeanFlow's "separate" form: no flow source holds it
Reading = tuple[Objective, int | None]  # an objective to read a source by, and the decoupled depth to read it at


def init_from(source: str, target: DiTConfig, fresh: dict[str, torch.Tensor], class_names: list[str] | None,
              weights: str | None = None, objective: Objective = DDPM) -> InitFrom:
    """Load `source` and map it onto `target`, whose fresh initialisation `fresh` fills whatever is not carried.

    `weights` is "ema" or "model" as asked, or None: the EMA unless `read_source` finds it stale. `objective` is the
    run's.
    """
    if not Path(source).exists() and parse_hub_id(str(source)) is None:
        raise UserError(f"--init-from {source} not found",
                        "pass a checkpoint file, a diffusers folder or a hub id org/name[@revision]")
    # Heads cannot be read from a bare state dict: a preset width gives them, else the model to train does.
    heads = None if target.hidden_size in HEADS_BY_WIDTH else target.num_heads
    checkpoint, stale, note = read_source(source, heads, weights, foreign_readings(objective, target))
    check_architecture(checkpoint.config, target, source)
    notes = tuple(line for line in (note, objective_change(checkpoint, objective, source)) if line)
    config = replace(target, timestep_convention=checkpoint.config.timestep_convention,
                     norm_eps=checkpoint.config.norm_eps)
    plan = plan_labels(checkpoint, target, class_names)
    state = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint.state_dict.items()}
    source_grid = math.isqrt(checkpoint.config.num_patches)
    if checkpoint.config.input_size != target.input_size:
        state["pos_embed"] = fresh["pos_embed"].clone()  # the fixed sin-cos table of the new grid
    state[LABEL_TABLE] = map_label_rows(state[LABEL_TABLE], fresh[LABEL_TABLE], plan, checkpoint.config, target)
    for key in fresh.keys() - state.keys():  # a mean-flow model's own embedder of t - r starts fresh
        if key.startswith(SECOND_TIME_EMBEDDER):
            state[key] = fresh[key].clone()
    return InitFrom(str(source), checkpoint.format, checkpoint.weights, config, state, plan, source_grid, stale, notes)


def load_teacher(source: str, target: DiTConfig, objective: Objective, device: torch.device) -> DiT:
    """`--teacher`: the frozen flow model whose velocity `--train-guidance distill` trains towards, read as
    `--init-from` reads a source (its EMA; a SiT or REPA file as the flow of the run's time direction). It must be a
    flow model running the run's time direction, with the run's architecture, image size and classes: its outputs
    are the targets, row by row."""
    if not Path(source).exists() and parse_hub_id(str(source)) is None:
        raise UserError(f"--teacher {source} not found",
                        "pass a flow model's checkpoint file, a diffusers folder or a hub id org/name[@revision]")
    heads = None if target.hidden_size in HEADS_BY_WIDTH else target.num_heads
    try:  # a file that records no objective (SiT, REPA) is read as the flow of the run's direction
        checkpoint = load_source(source, heads, None, ((FlowObjective(objective.time_direction), None),))
    except UserError as refused:
        raise UserError(f"--teacher: {refused.what}", refused.hint) from None
    objective.check_teacher(checkpoint.objective, source)
    check_architecture(checkpoint.config, target, source, "--teacher")
    differences = [f"{label} {getattr(checkpoint.config, field)} (teacher) vs {getattr(target, field)}"
                   for field, label in (("input_size", "input size"), ("num_classes", "classes"))
                   if getattr(checkpoint.config, field) != getattr(target, field)]
    if differences:
        raise UserError(f"--teacher {source} was trained for other inputs than this run's: " + "; ".join(differences),
                        "pass a teacher of the run's image size and classes")
    return checkpoint.build(device)  # in eval mode, without gradients


def foreign_readings(objective: Objective, target: DiTConfig) -> tuple[Reading, ...]:
    """How a run reads a source from elsewhere that records no objective (a SiT, REPA or DMF release), as `dit sample`
    reads it given the same --objective, --time-direction and --decoupled-depth: as the run's objective at the run's
    decoupled depth (a DMF file, whose tensors cannot tell its depth), or as the flow of its time direction (a
    mean-flow run's start, DMF's). None for a run without a time direction: such a file stays refused, naming the
    options."""
    direction = getattr(objective, "time_direction", None)
    return () if direction is None else ((objective, target.decoupled_depth), (FlowObjective(direction), None))


def load_source(source: str, heads: int | None, weights: str | None, readings: tuple[Reading, ...]) -> Checkpoint:
    """The source by its own record, or, where it records no objective and is refused without one, by the first of
    `readings` it fits; the first refusal where none does."""
    try:
        return load_checkpoint(source, num_heads=heads, weights=weights, weights_flag="--init-weights")
    except UserError as refused:
        for objective, depth in readings:
            try:
                return load_checkpoint(source, num_heads=heads, weights=weights, objective=objective,
                                       decoupled_depth=depth, weights_flag="--init-weights")
            except UserError:
                continue
        raise refused from None


def read_source(source: str, heads: int | None, weights: str | None, readings: tuple[Reading, ...] = ()
                ) -> tuple[Checkpoint, EmaRecord | None, str | None]:
    """The source's weights, the EMA record that says they are mostly initial weights (or None), and the line to say.

    A stale EMA is swapped for the model weights when `weights` is None and the source holds them (a `dit train`
    checkpoint, the one source with a step and both sets); asked for, or the only set, it is kept with a warning.
    """
    checkpoint = load_source(source, heads, weights, readings)
    record = checkpoint.ema if checkpoint.weights == "ema" else None
    if record is None or not record.mostly_initial:
        return checkpoint, None, None
    both = checkpoint.step is not None
    if weights is None and both:
        return (load_source(source, heads, "model", readings), record,
                f"warning: --init-from {source}: starting from its model weights, not its EMA weights, which have "
                f"{record.history()}; pass --init-weights ema to start from the EMA anyway")
    fix = ("pass --init-weights model, or train the source longer" if both else
           "train the source longer, or --init-from its dit train checkpoint with --init-weights model")
    held = "its EMA weights (--init-weights ema)" if both else "only EMA weights"
    return (checkpoint, record, f"warning: --init-from {source} gives {held}, which have {record.history()}, so the "
                                f"fine-tune starts near scratch; {fix}")


def check_architecture(source: DiTConfig, target: DiTConfig, name: str, flag: str = "--init-from") -> None:
    """One line naming every difference that makes the weights unusable for `target`."""
    differences = [f"{label} {getattr(source, field)} (source) vs {getattr(target, field)}"
                   for field, label in ARCHITECTURE if getattr(source, field) != getattr(target, field)]
    if source.mlp_ratio != target.mlp_ratio:
        fix = f"no dit train option sets the MLP ratio: fine-tune a source of ratio {target.mlp_ratio:g}"
    else:
        fix = f"train the source's shape: {source_flags(source)}"
    if differences:
        raise UserError(f"{flag} {name} holds {describe(source)}, which does not match the model to train: "
                        + "; ".join(differences), fix)


def objective_change(checkpoint: Checkpoint, objective: Objective, name: str) -> str | None:
    """The warning for a source recorded as another objective than the run's; None when they agree or the file does not
    say (a released .pt). A flow source whose time runs the other way is an error."""
    source = checkpoint.objective
    if not checkpoint.objective_recorded or source == objective:
        return None
    return objective.check_source(source, name)


def source_flags(config: DiTConfig) -> str:
    """The `dit train` options that give the source's architecture: every field of ARCHITECTURE that an option sets
    (the MLP ratio has none: `check_architecture` says so)."""
    base = next((name for name, shape in PRESET_SHAPES.items()
                 if (shape["depth"], shape["hidden_size"], shape["num_heads"])
                 == (config.depth, config.hidden_size, config.num_heads)), None)
    flags = [f"--model {base}/{config.patch_size}"] if base else [
        f"--model DiT-S/{config.patch_size} --hidden-size {config.hidden_size} --depth {config.depth} "
        f"--num-heads {config.num_heads}"]
    latent = config.in_channels == LATENT_CHANNELS
    flags.append("--vae ema" if latent else f"--vae none --channels {config.in_channels}")
    flags.append("--learn-sigma" if config.learn_sigma else "--no-learn-sigma")
    return " ".join(flags)


def plan_labels(checkpoint: Checkpoint, target: DiTConfig, class_names: list[str] | None) -> LabelPlan:
    """Pair each new class with a source row: by name when both sides have names, else by id."""
    source = checkpoint.config
    null_row = "none" if target.label_rows == target.num_classes else (
        "copied" if source.label_rows > source.num_classes else "fresh")
    source_names = named_table(checkpoint)
    if source_names is not None and has_names(class_names):
        return LabelPlan(tuple(find_class(source_names, name) for name in class_names), "name", null_row)
    shared = min(source.num_classes, target.num_classes)
    rows = tuple(i if i < shared else None for i in range(target.num_classes))
    return LabelPlan(rows, "id", null_row)


def named_table(checkpoint: Checkpoint) -> ClassTable | None:
    """The source's class names: its own, or ImageNet-1k for a 1000-class model without any; None if unnamed."""
    if has_names(checkpoint.class_names) or checkpoint.config.num_classes == IMAGENET_CLASSES:
        return class_table(checkpoint.config.num_classes, checkpoint.class_names)
    return None


def has_names(names: list[str] | None) -> bool:
    """Real class names, not the ids an .npz without `class_names` is given ("0", "1", ...)."""
    return bool(names) and names != [str(i) for i in range(len(names))]


def find_class(table: ClassTable, name: str) -> int | None:
    """The source class of this name or WordNet id (case-, space- and underscore-insensitive); None if absent or
    ambiguous."""
    if name.lower() in table.by_wnid:
        return table.by_wnid[name.lower()]
    ids = table.by_name.get(normalize(name), [])
    return ids[0] if len(ids) == 1 else None


def map_label_rows(source: torch.Tensor, fresh: torch.Tensor, plan: LabelPlan, source_config: DiTConfig,
                   target: DiTConfig) -> torch.Tensor:
    """The new label table (rows, D): paired rows from the source, the rest from the fresh model's table."""
    table = fresh.clone()  # (target rows, D)
    for row, source_row in enumerate(plan.rows):
        if source_row is not None:
            table[row] = source[source_row]
    if plan.null_row == "copied":
        table[target.num_classes] = source[source_config.num_classes]
    return table


def apply(model: DiT, init: InitFrom) -> None:
    """Load the mapped weights into the freshly built `model`, and give it the source's forward convention."""
    model.set_forward(init.config.timestep_convention, init.config.norm_eps)
    model.load_state_dict(init.state_dict, strict=True)
