"""TODO docstring."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

from ditcli.diffusion.ddpm import BETA_SCHEDULES
from ditcli.diffusion.flow import TIME_DIRECTIONS, TIME_SAMPLINGS
from ditcli.diffusion.objectives import (
    DEFAULT_TIME_DIRECTION,
    OBJECTIVES,
    build_objective,
)
from ditcli.errors import UserError
from ditcli.model.codec import DEFAULT_VAE, LATENT_CHANNELS, VAE_ALIASES, VaeCodec
from ditcli.model.dit import DiTConfig, preset, preset_names
from ditcli.training.trackers import check_trackers
from ditcli.weights.checkpoint import WEIGHT_CHOICES

# Fields that may change when resuming; any other difference needs --force.
# Upper bounds of the size options: far above any real run, low enough that a typo cannot allocate the machine away.
MAX_GLOBAL_BATCH = 1 << 20


MAX_IMAGE_SIZE = 4096


MAX_HIDDEN_SIZE = 16384


MAX_DEPTH = 512


LR_SCHEDULES = ("constant", "cosine")


RESUMABLE_CHANGES = {"steps", "ckpt_every", "keep_last", "sample_every", "log_every", "log", "eval_every", "eval_ref",
                     "eval_num", "eval_features", "micro_batch", "compile",
                     "grad_checkpointing", "device", "max_bad_steps", "precision", "init_from", "init_weights"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; stored in every checkpoint as plain data."""

    data: str
    out: str = "runs/dit"
    model: str = "DiT-S/2"
    image_size: int = 256
    channels: int = 3
    vae: str | None = DEFAULT_VAE
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    learn_sigma: bool = True
    class_dropout_prob: float = DiTConfig.class_dropout_prob
    objective: str = "ddpm"
    schedule: str = "linear"  # ddpm only
    time_direction: str = DEFAULT_TIME_DIRECTION  # flow only, as the three below
    time_sampling: str = "uniform"
    time_shift: float = 1.0
    steps: int = 400_000
    global_batch: int = 256
    micro_batch: int | None = None
    lr: float = 1e-4
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    grad_clip: float | None = None
    precision: str = "fp32"
    flip: bool = True
    seed: int = 0
    ckpt_every: int = 50_000
    keep_last: int = 3
    sample_every: int = 0
    log_every: int = 100
    log: tuple[str, ...] = ("jsonl",)  # trackers besides metrics.jsonl, which is always written (ditcli.training.trackers)
    eval_every: int = 0  # FID of the EMA every N steps (ditcli.evaluation); 0 never
    eval_ref: str | None = None
    eval_num: int = 1000
    eval_features: str = "inception"
    max_bad_steps: int = 10
    grad_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"
    init_from: str | None = None  # start from these weights (ditcli.training.finetune) instead of a fresh model
    init_weights: str | None = None  # "ema", "model", or None: the EMA unless it is stale (ditcli.training.finetune)

    def __post_init__(self):
        """Every option checked on its own, naming it, before any data is read or file written."""
        for flag, value, low, high in self.integer_ranges():
            if value is not None and not low <= value <= high:
                raise UserError(f"{flag} must be between {low:,} and {high:,}, got {value:,}",
                                f"pass {flag} {min(max(value, low), high)}")
        for flag, value, ok, rule, hint in self.float_checks():
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise UserError(f"{flag} must be {rule}, got {value:g}", hint)
        if not self.data:
            raise UserError("--data is empty", "pass an image folder, an .npz or 'fashion-mnist'")
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"unknown training precision {self.precision!r}",
                            "choose fp32 or bf16; fp16 would need loss scaling")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown --lr-schedule {self.lr_schedule!r}", f"choose from {', '.join(LR_SCHEDULES)}")
        if self.schedule not in BETA_SCHEDULES:
            raise UserError(f"unknown --schedule {self.schedule!r}", f"choose from {', '.join(BETA_SCHEDULES)}")
        self.check_objective()
        check_trackers(tuple(self.log))
        if self.eval_every and not self.eval_ref:
            raise UserError("--eval-every needs --eval-ref", "pass the reference .npz to score against "
                            "(`dit fid --make-ref DATA -o REF.npz`), or drop --eval-every")
        if self.init_weights is not None and self.init_weights not in WEIGHT_CHOICES:
            raise UserError(f"unknown --init-weights {self.init_weights!r}", f"choose {' or '.join(WEIGHT_CHOICES)}")
        if self.channels not in (1, 3):
            raise UserError(f"--channels {self.channels} is not supported", "pass 1 (grayscale) or 3 (RGB)")
        if self.latent and self.channels != 3:
            raise UserError(f"--channels {self.channels} needs a pixel-space model: the VAE encodes RGB images",
                            "add --vae none, or drop --channels")
        self.check_architecture()

    def check_objective(self) -> None:
        """--objective and the options that belong to one objective only."""
        for flag, value, choices in (("--objective", self.objective, OBJECTIVES),
                                     ("--time-direction", self.time_direction, TIME_DIRECTIONS),
                                     ("--time-sampling", self.time_sampling, TIME_SAMPLINGS)):
            if value not in choices:
                raise UserError(f"unknown {flag} {value!r}", f"choose from {', '.join(choices)}")
        if not (math.isfinite(self.time_shift) and self.time_shift > 0):
            raise UserError(f"--time-shift must be a finite number > 0, got {self.time_shift:g}",
                            "1 leaves the times as drawn; > 1 spends more steps at high noise")
        flow_only = [flag for flag, value, default in (
            ("--time-direction", self.time_direction, DEFAULT_TIME_DIRECTION),
            ("--time-sampling", self.time_sampling, "uniform"), ("--time-shift", self.time_shift, 1.0))
            if value != default]
        if self.objective == "ddpm" and flow_only:
            verb = "applies" if len(flow_only) == 1 else "apply"
            raise UserError(f"{', '.join(flow_only)} only {verb} to --objective flow", "add --objective flow")
        if self.objective == "flow" and self.schedule != "linear":
            raise UserError("--schedule (the beta schedule) only applies to --objective ddpm",
                            "drop --schedule, or train with --objective ddpm")

    def build_objective(self):
        """The training process: `Diffusion` or `FlowMatching` (ditcli.diffusion.objectives)."""
        return build_objective(self.objective, learn_sigma=self.learn_sigma, schedule=self.schedule,
                               time_direction=self.time_direction, time_sampling=self.time_sampling,
                               time_shift=self.time_shift)

    def integer_ranges(self) -> list[tuple[str, int | None, int, int]]:
        """(option, value, lowest, highest): the highest keep a typo from allocating the machine away."""
        return [("--steps", self.steps, 1, 10**12), ("--global-batch", self.global_batch, 1, MAX_GLOBAL_BATCH),
                ("--micro-batch", self.micro_batch, 1, MAX_GLOBAL_BATCH),
                ("--image-size", self.image_size, 1, MAX_IMAGE_SIZE),
                ("--hidden-size", self.hidden_size, 4, MAX_HIDDEN_SIZE), ("--depth", self.depth, 1, MAX_DEPTH),
                ("--num-heads", self.num_heads, 1, MAX_HIDDEN_SIZE), ("--keep-last", self.keep_last, 1, 10**6),
                ("--log-every", self.log_every, 1, 10**12), ("--ckpt-every", self.ckpt_every, 1, 10**12),
                ("--sample-every", self.sample_every, 0, 10**12), ("--max-bad-steps", self.max_bad_steps, 1, 10**6),
                ("--eval-every", self.eval_every, 0, 10**12), ("--eval-num", self.eval_num, 2, 10**7),
                ("--lr-warmup", self.lr_warmup, 0, max(0, self.steps - 1)), ("--seed", self.seed, 0, 2**63 - 1)]

    def float_checks(self) -> list[tuple[str, float | None, Callable[[float], bool], str, str]]:
        """(option, value, test of a finite value, the rule, how to fix)."""
        return [("--lr", self.lr, lambda v: v > 0, "a finite number > 0", "e.g. --lr 1e-4"),
                ("--weight-decay", self.weight_decay, lambda v: v >= 0, "a finite number >= 0", "e.g. 0"),
                ("--ema-decay", self.ema_decay, lambda v: 0 <= v < 1, "in [0, 1)", "e.g. 0.9999"),
                ("--grad-clip", self.grad_clip, lambda v: v >= 0, "a finite norm >= 0",
                 "pass the norm to clip at, or 0 to not clip"),
                ("--class-dropout-prob", self.class_dropout_prob, lambda v: 0 <= v < 1, "in [0, 1)",
                 "0.1 as DiT; 0 trains without a null class, so no classifier-free guidance")]

    def check_architecture(self) -> None:
        """The model's shape options against each other; the class count is not known yet, so any will do."""
        if self.model not in preset_names():
            raise UserError(f"unknown --model {self.model!r}", f"choose from {', '.join(preset_names())}")
        width = self.hidden_size or preset(self.model).hidden_size
        heads = self.num_heads or preset(self.model).num_heads
        if width % 4:
            raise UserError(f"--hidden-size {width} is not a multiple of 4", f"pass e.g. {max(4, width // 4 * 4)}")
        if width % heads:
            raise UserError(f"--num-heads {heads} does not divide --hidden-size {width}",
                            "choose heads whose head width hidden/heads is a whole number, e.g. "
                            f"--num-heads {math.gcd(width, 16)}")
        self.model_config(0)

    @property
    def latent(self) -> bool:
        return self.vae is not None

    def check_image_size(self) -> None:
        """The image must split into whole patches of whole latent pixels."""
        downsample = VaeCodec.downsample if self.latent else 1
        patch = preset(self.model).patch_size
        unit = downsample * patch
        if self.image_size % unit:
            what = f"8 x patch = {unit}" if self.latent else f"the patch size {patch}"
            suggestion = max(unit, self.image_size // unit * unit)
            raise UserError(f"--image-size {self.image_size} is not a multiple of {what}", f"use e.g. {suggestion}")

    def model_config(self, num_classes: int) -> DiTConfig:
        """The DiT this run trains: a preset, with any custom width/depth/heads, at the latent resolution."""
        self.check_image_size()
        downsample = VaeCodec.downsample if self.latent else 1
        overrides = {k: v for k, v in (("hidden_size", self.hidden_size), ("depth", self.depth),
                                       ("num_heads", self.num_heads)) if v is not None}
        return preset(self.model, input_size=self.image_size // downsample, num_classes=num_classes,
                      in_channels=LATENT_CHANNELS if self.latent else self.channels, learn_sigma=self.learn_sigma,
                      class_dropout_prob=self.class_dropout_prob, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int) -> float:
        """The learning rate of update `step` (0-based): linear warm-up over `lr_warmup` updates, then `lr` held
        (constant) or annealed to 0 at `steps` along a half cosine (SGDR, Loshchilov & Hutter, 2017)."""
        if step < self.lr_warmup:
            return self.lr * (step + 1) / self.lr_warmup
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.lr_warmup) / max(1, self.steps - self.lr_warmup))
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# A small pixel-space DiT for the embedded Fashion-MNIST models: 28x28 at patch 4 is 49 tokens.
FASHION_MNIST = dict(data="fashion-mnist", model="DiT-S/4", image_size=28, channels=1, vae=None, hidden_size=192,
                     depth=6, num_heads=3, global_batch=128, lr=3e-4, ema_decay=0.999, ema_warmup=True,
                     precision="fp32", flip=False, ckpt_every=250, sample_every=2000, log_every=50, grad_clip=1.0)


TRAIN_PRESETS = {
    # The shipped `fashion-mnist` model's first stage (docs/flow.md): SiT's flow with logit-normal times.
    "fashion-mnist": dict(FASHION_MNIST, objective="flow", learn_sigma=False, time_sampling="logit-normal",
                          steps=5500, lr_schedule="cosine", lr_warmup=200),
    # The DDPM model, `fashion-mnist-ddpm` (docs/fashion-mnist.md): constant lr, stopped by hand at step 7,017.
    "fashion-mnist-ddpm": dict(FASHION_MNIST, steps=40_000),
}


def train_preset(name: str, **overrides) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise UserError(f"unknown training preset {name!r}", f"choose from {', '.join(TRAIN_PRESETS)}")
    preset = dict(TRAIN_PRESETS[name])
    if overrides.get("objective", preset.get("objective", "ddpm")) != preset.get("objective", "ddpm"):
        for flow_only in ("time_sampling", "time_shift", "time_direction"):  # the recipe's, not the user's
            preset.pop(flow_only, None)
    if "steps" in overrides and "lr_warmup" in preset and "lr_warmup" not in overrides:
        preset["lr_warmup"] = min(preset["lr_warmup"], overrides["steps"] // 10)  # a short trial run still decays
    return TrainConfig(**{**preset, **overrides})


def config_from_options(preset: str | None, **options) -> TrainConfig:
    """The TrainConfig of `dit train`: options left None take the --preset's value, else TrainConfig's default.

    --vae takes an alias (ema, mse), an id or a folder; 'none' trains in pixel space.
    """
    vae = options.get("vae")
    chosen = {k: v for k, v in options.items() if v is not None}
    if vae is not None:
        chosen["vae"] = None if vae.lower() == "none" else VAE_ALIASES.get(vae, vae)
    if preset is not None:
        return train_preset(preset, **chosen)
    if options.get("data") is None:
        raise UserError("no training data given",
                        "pass --data FOLDER|FILE.npz|fashion-mnist, or --preset fashion-mnist")
    return TrainConfig(**chosen)
