"""`dit train`'s run definition: `TrainConfig` (one flat record, checked on creation), its limits, the training
presets, and what may change on resume.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ditcli.diffusion.ddpm import BETA_SCHEDULES
from ditcli.diffusion.flow import TIME_DIRECTIONS, TIME_SAMPLINGS, check_time_shift
from ditcli.diffusion.guidance import MAX_SEED
from ditcli.diffusion.meanflow import GUIDANCE_FORMS, TrainedGuidance
from ditcli.diffusion.objectives import (
    DEFAULT_TIME_DIRECTION,
    OBJECTIVES,
    Objective,
    objective_from_record,
)
from ditcli.diffusion.process import Process
from ditcli.diffusion.samplers import check_sampler_settings
from ditcli.errors import UserError
from ditcli.evaluation.features import INCEPTION
from ditcli.model.codec import DEFAULT_VAE, LATENT_CHANNELS, VAE_ALIASES, VaeCodec
from ditcli.model.dit import (
    MAX_DEPTH,
    MAX_HIDDEN_SIZE,
    MAX_IMAGE_SIZE,
    DiTConfig,
    preset,
    preset_names,
)
from ditcli.sampling.request import MAX_CFG, MAX_STEPS
from ditcli.training.align import (
    ALIGN_WEIGHT,
    DISPERSIVE_TEMPERATURE,
    DISPERSIVE_WEIGHT,
    REPA_PROJECTOR_DIM,
    check_alignment,
)
from ditcli.training.trackers import check_trackers
from ditcli.weights.checkpoint import WEIGHT_CHOICES

# Upper bounds of the size options: far above any real run, low enough that a typo cannot allocate the machine away.
MAX_GLOBAL_BATCH = 1 << 20
LR_SCHEDULES = ("constant", "cosine")
# Fields that may change when resuming; any other difference needs --force.
TRAINED_GUIDANCE = ("none", *GUIDANCE_FORMS)  # --train-guidance
# The options of one objective only (or of a few): each is refused where its objective does not take it.
OBJECTIVE_SETTINGS = ("time_direction", "time_sampling", "time_shift", "decoupled_depth", "interval_ratio",
                      "mf_time_mean", "mf_time_std", "mf_r_time", "adaptive_p", "adaptive_c", "train_guidance",
                      "train_omega", "train_kappa", "train_guidance_interval", "teacher")
RESUMABLE_CHANGES = {"steps", "ckpt_every", "keep_last", "sample_every", "log_every", "log", "eval_every", "eval_ref",
                     "eval_num", "eval_features", "eval_sampler", "eval_steps", "eval_cfg", "micro_batch", "compile",
                     "grad_checkpointing", "device", "max_bad_steps", "precision", "init_from", "init_weights",
                     "dinov2_weights"}


# The groups of TrainConfig's fields, in the order `dit train --help` shows them as panels.
DATA, MODEL, OBJECTIVE, ALIGNMENT, OPTIMISATION, CHECKPOINTS, EVALUATION, LOGGING, PERFORMANCE = OPTION_GROUPS = (
    "Data", "Model", "Objective", "Alignment", "Optimisation", "Checkpoints", "Evaluation", "Logging", "Performance")


def number_pair(text: str) -> tuple[float, float]:
    """"A,B" as two numbers; (nan, nan) when it is not two numbers, for the caller's range check to refuse."""
    parts = text.split(",")
    try:
        return (float(parts[0]), float(parts[1])) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        return math.nan, math.nan


def option(default=MISSING, *, help: str, group: str, flag: str | None = None, parse: type | None = None):
    """A TrainConfig field that is also a `dit train` option, declared once (litgpt's args.py): its help text and
    its group. The flag is --<name> (--<name>/--no-<name> for a bool) unless `flag` names it; `parse` is the type the
    command reads the value as, when not the field's (a Path for a str). ditcli/cli/train.py builds the options."""
    return field(default=default, metadata={"help": help, "group": group, "flag": flag, "parse": parse})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; stored in every checkpoint as plain data. Each field is one option of
    `dit train`, declared by `option` (help text and group)."""

    # Data.
    data: str = option(help="Image folder (class sub-folders or flat), an .npz, a folder of idx files, or "
                            "'fashion-mnist' (also fashion-mnist:test). Default: the --preset's; required without one.",
                       group=DATA)
    image_size: int = option(256, help="Training resolution in pixels.", group=DATA)
    channels: int = option(3, help="Image channels: 1 (grayscale, pixel models only) or 3.", group=DATA)
    flip: bool = option(True, help="Random horizontal flips.", group=DATA)

    # Model.
    model: str = option("DiT-S/2", help=f"Architecture: {', '.join(preset_names())}.", group=MODEL)
    vae: str | None = option(DEFAULT_VAE, help="ema, mse, a hub id or a local AutoencoderKL directory; 'none' trains "
                                               "in pixel space.", group=MODEL)
    hidden_size: int | None = option(None, help="Transformer width (a multiple of 4 and of --num-heads). Default: the "
                                                "--model's.", group=MODEL)
    depth: int | None = option(None, help="Number of DiT blocks. Default: the --model's.", group=MODEL)
    num_heads: int | None = option(None, help="Attention heads. Default: the --model's.", group=MODEL)
    class_dropout_prob: float = option(DiTConfig.class_dropout_prob, help="Share of labels dropped to the null class, "
                                       "for guidance; 0 disables guidance.", group=MODEL)
    # Start from these weights (ditcli.training.finetune) instead of a fresh model; None: the EMA unless it is stale.
    init_from: str | None = option(None, help="Fine-tune: start from these weights (a .pt, .safetensors, training "
                                   "checkpoint, diffusers folder or hub id org/name[@rev]); same architecture, any "
                                   "image size and classes. Default: a fresh model.", group=MODEL)
    init_weights: str | None = option(None, help="Which weights of a dit train checkpoint --init-from reads: ema or "
                                      "model. Default: ema, or model when the EMA record says the EMA is still mostly "
                                      "the initial weights.", group=MODEL)

    # Objective: schedule is ddpm's only, the time options flow's only.
    objective: str = option("ddpm", help="ddpm (DiT: eps prediction on a beta schedule), flow (SiT: velocity on the "
                            "linear path x_t = t x + (1 - t) eps) or meanflow (MeanFlow: the average velocity over "
                            "the interval from r to t, sampled in 1-4 steps); recorded in every checkpoint.",
                            group=OBJECTIVE)
    learn_sigma: bool = option(True, help="Learn the variance too (DiT, IDDPM's hybrid loss).", group=OBJECTIVE)
    schedule: str = option("linear", help="Beta schedule: linear (DiT) or cosine (IDDPM); recorded in every "
                                          "checkpoint.", group=OBJECTIVE)
    time_direction: str = option(DEFAULT_TIME_DIRECTION, help="Flow time: noise-to-data (SiT: t = 1 is data) or "
                                 "data-to-noise (REPA, SD3).", group=OBJECTIVE)
    time_sampling: str = option("uniform", help="Flow training times: uniform (SiT) or logit-normal (mean 0, std 1; "
                                "SD3, LightningDiT).", group=OBJECTIVE)
    time_shift: float = option(1.0, help="Flow training times shifted as s' = S s / (1 + (S - 1) s) on the noise "
                               "level s (> 0; > 1 trains more at high noise).", group=OBJECTIVE)
    # Objective, meanflow only: its network form, times, loss weight and trained-in guidance.
    decoupled_depth: int | None = option(None, help="Mean flow as Decoupled MeanFlow: the first K blocks see t, the "
                                         "rest and the final layer see r through the same t_embedder (no new "
                                         "weights: the cheap fine-tune of a flow model). Default: MeanFlow's own "
                                         "form, an extra embedder of t - r.", group=OBJECTIVE)
    interval_ratio: float = option(0.25, help="Mean flow: the fraction of each batch trained on an interval (r != t); "
                                   "the rest learn the instantaneous velocity (r = t). In [0, 1].", group=OBJECTIVE)
    mf_time_mean: float = option(-0.4, help="Mean flow: mean of the logit-normal noise levels of t and r.",
                                 group=OBJECTIVE)
    mf_time_std: float = option(1.0, help="Mean flow: standard deviation of the logit-normal noise levels (> 0).",
                                group=OBJECTIVE)
    mf_r_time: str | None = option(None, help="Mean flow: MEAN,STD of a logit-normal of r's own (DMF's proposals: "
                                   "t's and r's levels drawn apart, then sorted so t >= r). Default: both drawn as "
                                   "t's.", group=OBJECTIVE)
    adaptive_p: float = option(1.0, help="Mean flow: the adaptive loss weight L / sg((L + c)^p) of MeanFlow's "
                               "official code; p = 0 trains the plain squared error.", group=OBJECTIVE)
    adaptive_c: float = option(0.01, help="Mean flow: c of the adaptive weight (> 0).", group=OBJECTIVE)
    train_guidance: str = option("none", help="Mean flow: guidance trained into the target: none, meanflow (omega v "
                                 "+ kappa u_cond + (1 - omega - kappa) u_uncond), model (DMF: v + omega (u_cond - "
                                 "u_uncond)) or distill (DMF: --teacher's velocity at scale omega).", group=OBJECTIVE)
    train_omega: float = option(1.0, help="Mean flow: omega of the trained guidance.", group=OBJECTIVE)
    train_kappa: float = option(0.0, help="Mean flow: kappa of MeanFlow's trained guidance.", group=OBJECTIVE)
    train_guidance_interval: str = option("0,1", help="Mean flow: LOW,HIGH, the times t (the model's own) where the "
                                          "trained guidance applies.", group=OBJECTIVE)
    teacher: str | None = option(None, help="Mean flow: the frozen flow model (of the run's shape, classes and time) "
                                 "--train-guidance distill trains towards. Default: none.", group=OBJECTIVE)

    # Alignment (ditcli.training.align): an extra loss on the tokens after one block; none by default.
    align: str = option("none", help="Representation alignment: none, repa (REPA: block D's tokens through an MLP "
                        "projector towards a frozen encoder's patch tokens of the clean image, by negative cosine) or "
                        "self (SRA: towards a later block of the EMA at a less noisy time, through a small head; no "
                        "encoder).", group=ALIGNMENT)
    align_encoder: str | None = option(None, help="--align repa's encoder: dinov2 (the file of --dinov2-weights), "
                                       "fashion-judge (weights/fashion-judge.safetensors) or a file of either kind. "
                                       "Default: none; --align repa needs one.", group=ALIGNMENT)
    align_depth: int | None = option(None, help="The block aligned, counted from 1. Default: repa a third of the "
                                     "depth, at most 8 (REPA: 8 of 28); self a sixth, at most 4 (SRA: 4 of 28).",
                                     group=ALIGNMENT)
    align_weight: float = option(ALIGN_WEIGHT, help="Weight of the alignment loss (REPA's proj_coeff).",
                                 group=ALIGNMENT)
    align_projector_dim: int = option(REPA_PROJECTOR_DIM, help="--align repa: width of the projector's two hidden "
                                      "layers.", group=ALIGNMENT)
    align_teacher_depth: int | None = option(None, help="--align self: the EMA's block the student aligns to, at "
                                             "least --align-depth. Default: twice --align-depth, at most the depth.",
                                             group=ALIGNMENT)
    dispersive: bool = option(False, help="Add the dispersive loss (Diffuse and Disperse): the tokens after one block "
                              "of a batch's images pushed apart; no parameters, no encoder.", group=ALIGNMENT,
                              flag="--dispersive")
    dispersive_depth: int | None = option(None, help="--dispersive: the block it reads. Default: the last.",
                                          group=ALIGNMENT)
    dispersive_weight: float = option(DISPERSIVE_WEIGHT, help="--dispersive: its weight (lambda).", group=ALIGNMENT)
    dispersive_temperature: float = option(DISPERSIVE_TEMPERATURE, help="--dispersive: its temperature tau, on "
                                           "squared distances divided by the feature count (> 0).", group=ALIGNMENT)

    # Optimisation.
    steps: int = option(400_000, help="Total optimizer steps.", group=OPTIMISATION)
    global_batch: int = option(256, help="Images per step, all ranks.", group=OPTIMISATION)
    lr: float = option(1e-4, help="AdamW learning rate (> 0).", group=OPTIMISATION)
    lr_schedule: str = option("constant", help="Learning rate after the warm-up: constant, or cosine (annealed to 0 "
                                               "at --steps).", group=OPTIMISATION)
    lr_warmup: int = option(0, help="Steps of linear learning-rate warm-up from 0.", group=OPTIMISATION)
    weight_decay: float = option(0.0, help="AdamW weight decay (>= 0).", group=OPTIMISATION)
    ema_decay: float = option(0.9999, help="Decay of the EMA weights that sampling uses, in [0, 1).",
                              group=OPTIMISATION)
    ema_warmup: bool = option(False, help="Ramp the EMA decay up as min(decay, (1 + n) / (10 + n)).",
                              group=OPTIMISATION)
    grad_clip: float | None = option(None, help="Clip the gradient norm to this (> 0); 0 does not clip. Default: no "
                                                "clipping.", group=OPTIMISATION)
    seed: int = option(0, help="Seed of the weights and of every step's draws.", group=OPTIMISATION)
    max_bad_steps: int = option(10, help="Stop after this many consecutive steps with a non-finite loss or gradient.",
                                group=OPTIMISATION)

    # Checkpoints.
    out: str = option("runs/dit", help="Run directory: checkpoints, metrics.jsonl, samples/.", group=CHECKPOINTS,
                      parse=Path)
    ckpt_every: int = option(50_000, help="Save a checkpoint every N steps (and at the end).", group=CHECKPOINTS)
    keep_last: int = option(3, help="Checkpoints kept; older ones are deleted.", group=CHECKPOINTS)

    # Evaluation: sample grids, and the FD of the EMA (ditcli.evaluation) every N steps; 0 never.
    sample_every: int = option(0, help="EMA sample grid every N steps; 0 never.", group=EVALUATION)
    eval_every: int = option(0, help="Every N steps, sample --eval-num images from the EMA (--eval-sampler, "
                             "--eval-steps, --eval-cfg) and log their FD and KID against --eval-ref (dit fid's code); "
                             "0 never.", group=EVALUATION)
    eval_ref: str | None = option(None, help="The reference .npz for --eval-every (dit fid --make-ref). Default: none.",
                                  group=EVALUATION)
    eval_num: int = option(1000, help="Images per evaluation.", group=EVALUATION)
    eval_features: str = option(INCEPTION, help="Feature extractor, as dit fid --features (fashion-judge for "
                                                "Fashion-MNIST).", group=EVALUATION)
    dinov2_weights: str | None = option(None, help="DINOv2 weights, a PATH or URL of a torch-hub dinov2_vit*14 "
                                        "checkpoint, for --eval-features dinov2 and --align-encoder dinov2. Default: "
                                        "the released ViT-L/14, downloaded once.", group=EVALUATION)
    # The evaluation's sampling; None: what the checkpoints record for `dit sample` (the objective's trained defaults).
    eval_sampler: str | None = option(None, help="Sampler of the evaluation, one of the objective's dit sample "
                                      "--sampler names. Default: the model's own (ddpm: dpm++2m, flow: heun, "
                                      "meanflow: flow-map).", group=EVALUATION)
    eval_steps: int | None = option(None, help="Sampling steps of the evaluation. Default: the model's own (25; 2 for "
                                    "meanflow).", group=EVALUATION)
    eval_cfg: float | None = option(None, help="Guidance scale of the evaluation (1: none). Default: the model's own "
                                    "(4, or 1 without a null class or with guidance trained in).", group=EVALUATION)

    # Logging: metrics.jsonl is always written; `log` names the trackers besides it (ditcli.training.trackers).
    log_every: int = option(100, help="Append a metrics.jsonl row every N steps.", group=LOGGING)
    log: tuple[str, ...] = option(("jsonl",), help="Experiment trackers besides metrics.jsonl (always written): "
                                  "tensorboard (OUT/tensorboard), wandb (honours WANDB_MODE=offline); repeat for "
                                  "several.", group=LOGGING)

    # Performance: how the run computes, not what it computes.
    micro_batch: int | None = option(None, help="Images per forward; the rest of a rank's share is accumulated. "
                                                "Default: the whole share.", group=PERFORMANCE)
    precision: str = option("fp32", help="fp32 or bf16 (autocast, fp32 master weights).", group=PERFORMANCE)
    grad_checkpointing: bool = option(False, help="Recompute block activations in the backward pass to save memory.",
                                      group=PERFORMANCE)
    compile: bool = option(False, help="torch.compile the model.", group=PERFORMANCE, flag="--compile")
    device: str = option("auto", help="auto, cpu, cuda, cuda:N or mps.", group=PERFORMANCE)

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
        check_objective(self)
        check_evaluation(self)
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
        check_alignment(self)

    def trained_guidance(self) -> TrainedGuidance:
        """--train-guidance and its omega, kappa and interval (ditcli.diffusion.meanflow)."""
        if self.train_guidance == "none":
            return TrainedGuidance()
        return TrainedGuidance(self.train_guidance, self.train_omega, self.train_kappa, self.guidance_interval())

    def guidance_interval(self) -> tuple[float, float]:
        """--train-guidance-interval LOW,HIGH: times t of the model's own, 0 <= LOW <= HIGH <= 1."""
        low, high = number_pair(self.train_guidance_interval)
        if not 0 <= low <= high <= 1:
            raise UserError(f"--train-guidance-interval must be LOW,HIGH with 0 <= LOW <= HIGH <= 1 in the model's "
                            f"time t, got {self.train_guidance_interval!r}", "pass e.g. 0,1 to guide every row")
        return low, high

    def training_objective(self) -> Objective:
        """The objective adapter of the run (ditcli.diffusion.objectives), with the guidance it trains in."""
        scale = self.trained_guidance().scale
        record = {} if scale == 1 else {"trained_cfg": scale}
        return objective_from_record(self.objective, self.time_direction, "run", **record)

    def build_objective(self) -> Process:
        """The training process the objective draws times, noises and losses from."""
        settings = {name: getattr(self, name) for name in OBJECTIVE_SETTINGS}
        settings["mf_r_time"] = None if self.mf_r_time is None else number_pair(self.mf_r_time)
        return self.training_objective().process(self.learn_sigma, self.schedule, guidance=self.trained_guidance(),
                                                 **settings)

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
                ("--eval-steps", self.eval_steps, 1, MAX_STEPS),
                ("--lr-warmup", self.lr_warmup, 0, max(0, self.steps - 1)), ("--seed", self.seed, 0, MAX_SEED)]

    def float_checks(self) -> list[tuple[str, float | None, Callable[[float], bool], str, str]]:
        """(option, value, test of a finite value, the rule, how to fix)."""
        # An AdamW step moves each weight by about lr; its decoupled decay multiplies it by 1 - lr x decay, which must
        # stay above 0 (at 1e300 the weights flipped sign, then overflowed, every step).
        return [("--lr", self.lr, lambda v: 0 < v <= 1, "a finite number in (0, 1]", "e.g. --lr 1e-4"),
                ("--weight-decay", self.weight_decay, lambda v: 0 <= v * (self.lr if self.lr > 0 else 1) < 1,
                 "a finite number >= 0 whose product with --lr is below 1", "e.g. 0, or 0.05"),
                ("--ema-decay", self.ema_decay, lambda v: 0 <= v < 1, "in [0, 1)", "e.g. 0.9999"),
                ("--grad-clip", self.grad_clip, lambda v: v >= 0, "a finite norm >= 0",
                 "pass the norm to clip at, or 0 to not clip"),
                ("--class-dropout-prob", self.class_dropout_prob, lambda v: 0 <= v < 1, "in [0, 1)",
                 "0.1 as DiT; 0 trains without a null class, so no classifier-free guidance"),
                ("--eval-cfg", self.eval_cfg, lambda v: 0 <= v <= MAX_CFG, f"in [0, {MAX_CFG:g}]",
                 "1 disables guidance, 0 is unconditional")]

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
        form = objective_from_record(self.objective, self.time_direction, "run").architecture(self.decoupled_depth)
        return preset(self.model, input_size=self.image_size // downsample, num_classes=num_classes,
                      in_channels=LATENT_CHANNELS if self.latent else self.channels, learn_sigma=self.learn_sigma,
                      class_dropout_prob=self.class_dropout_prob, **overrides, **form)

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


def check_objective(config: TrainConfig) -> None:
    """--objective and the options that belong to one objective only."""
    for flag, value, choices in (("--objective", config.objective, OBJECTIVES),
                                 ("--time-direction", config.time_direction, TIME_DIRECTIONS),
                                 ("--time-sampling", config.time_sampling, TIME_SAMPLINGS)):
        if value not in choices:
            raise UserError(f"unknown {flag} {value!r}", f"choose from {', '.join(choices)}")
    check_time_shift(config.time_shift, "--time-shift")
    given = [f"--{name.replace('_', '-')}" for name in OBJECTIVE_SETTINGS
             if getattr(config, name) != TrainConfig.__dataclass_fields__[name].default]
    objective_from_record(config.objective, config.time_direction, "run").check_training(config.schedule, given)
    check_mean_flow(config)


def check_evaluation(config: TrainConfig) -> None:
    """--eval-sampler must sample the run's objective (the steps and scale are ranges, checked with the others)."""
    objective = config.training_objective()
    if config.eval_sampler is not None and config.eval_sampler not in objective.samplers:
        raise UserError(f"--eval-sampler {config.eval_sampler!r} does not sample {objective.noun()}",
                        f"choose from {', '.join(objective.samplers)}")
    if config.eval_steps is not None:  # dopri5 chooses its own
        check_sampler_settings(config.eval_sampler or objective.trained_sampling.sampler, {"steps": "--eval-steps"},
                               "--eval-sampler")
    if config.eval_cfg not in (None, 1.0) and config.class_dropout_prob == 0:
        raise UserError(f"--eval-cfg {config.eval_cfg:g} needs a null class, and --class-dropout-prob 0 trains none",
                        "drop --eval-cfg, or train with --class-dropout-prob 0.1")


def check_mean_flow(config: TrainConfig) -> None:
    """The mean-flow options' ranges (they reach the process only once the run is built)."""
    numbers = (("--interval-ratio", config.interval_ratio, 0.0, 1.0),
               ("--mf-time-std", config.mf_time_std, 1e-6, 1e3), ("--mf-time-mean", config.mf_time_mean, -1e3, 1e3),
               ("--adaptive-p", config.adaptive_p, 0.0, 10.0), ("--adaptive-c", config.adaptive_c, 1e-12, 1e6),
               ("--train-omega", config.train_omega, -100, 100), ("--train-kappa", config.train_kappa, -100, 100))
    for flag, value, low, high in numbers:
        if not (math.isfinite(value) and low <= value <= high):
            raise UserError(f"{flag} must be a number in [{low:g}, {high:g}], got {value:g}")
    if config.train_guidance not in TRAINED_GUIDANCE:
        raise UserError(f"unknown --train-guidance {config.train_guidance!r}",
                        f"choose from {', '.join(TRAINED_GUIDANCE)}")
    if config.mf_r_time is not None:
        mean, std = number_pair(config.mf_r_time)
        if not (-1e3 <= mean <= 1e3 and 1e-6 <= std <= 1e3):
            raise UserError(f"--mf-r-time must be MEAN,STD with MEAN in [-1000, 1000] and STD in [1e-06, 1000], got "
                            f"{config.mf_r_time!r}", "pass e.g. -1.2,1 (DMF's r proposal)")
    unused = [f"--{name.replace('_', '-')}" for name in ("train_omega", "train_kappa", "train_guidance_interval")
              if getattr(config, name) != TrainConfig.__dataclass_fields__[name].default]
    if config.train_guidance == "none" and unused:
        raise UserError(f"{unused[0]} only applies with --train-guidance meanflow, model or distill",
                        f"add --train-guidance, or drop {unused[0]}")
    if config.train_guidance == "meanflow" and config.train_kappa >= 1:
        raise UserError(f"--train-kappa {config.train_kappa:g} leaves no room for omega: the trained scale is "
                        "omega / (1 - kappa)", "pass --train-kappa below 1 (MeanFlow's L/2: 0.92 with omega 0.2)")
    if config.train_guidance == "model" and not 0 <= config.train_omega < 1:
        raise UserError(f"--train-omega {config.train_omega:g} has no fixed point under model guidance: the target "
                        "feeds the model's own u_cond - u_uncond back, which then grows as 1 / (1 - omega)",
                        "pass --train-omega in [0, 1): 0.6 trains scale 2.5 (DMF), 2/3 scale 3")
    if config.train_guidance in ("model", "distill") and config.train_kappa != 0:
        raise UserError(f"--train-kappa {config.train_kappa:g} has no place in {config.train_guidance} guidance",
                        "drop --train-kappa, or pass --train-guidance meanflow")
    if config.train_guidance == "distill" and config.train_omega < 0:
        raise UserError(f"--train-omega {config.train_omega:g} is the teacher's guidance scale under distillation, "
                        "and a scale is not negative", "pass --train-omega 1 for the teacher's conditional velocity, "
                        "above 1 to guide it")
    if (config.train_guidance == "distill") != (config.teacher is not None):
        raise UserError("--train-guidance distill and --teacher go together: the teacher's velocity is the target"
                        if config.teacher is None else "--teacher only applies with --train-guidance distill",
                        "pass both, or neither")
    scale = config.trained_guidance().scale
    if config.train_guidance != "none" and not 0 <= scale <= MAX_CFG:
        given = f"--train-omega {config.train_omega:g}" + (f" with --train-kappa {config.train_kappa:g}"
                                                          if config.train_guidance == "meanflow" else "")
        raise UserError(f"{given} trains guidance scale {scale:g}, outside [0, {MAX_CFG:g}], the scales dit sample "
                        "--cfg takes", "pass an omega (and kappa) whose scale is in range: omega / (1 - kappa) for "
                        "meanflow, 1 / (1 - omega) for model, omega for distill")
    if config.decoupled_depth is not None:
        depth = config.depth or preset(config.model).depth
        if not 1 <= config.decoupled_depth <= depth:
            raise UserError(f"--decoupled-depth {config.decoupled_depth} is not in [1, {depth}], the model's depth",
                            f"pass a depth of 1 to {depth} (DMF-XL/2: 20 of 28)")


def check_image_shape(config: TrainConfig, shape: tuple[int, ...], source: str) -> None:
    """Images (N, H, W, C) that are not --image-size square with --channels are refused, naming the options that
    train them as they are."""
    _, height, width, channels = shape
    if (height, width, channels) == (config.image_size, config.image_size, config.channels):
        return
    kind = {1: "grayscale", 3: "RGB"}
    what = (f"{source} holds {width}x{height} {kind.get(channels, channels)} images, but this run trains "
            f"{config.image_size}x{config.image_size} {kind[config.channels]} ones (idx data is not resized)")
    options = fitting_options(config, height, channels) if height == width else None
    if options is None:
        raise UserError(what, "save the images to an .npz (np.savez(path, images=uint8 NHWC array, labels=ints)), "
                              "which is cropped and resized to --image-size")
    raise UserError(what, f"add {' '.join(options)}")


def fitting_options(config: TrainConfig, size: int, channels: int) -> list[str] | None:
    """The options that train `size`-px images of `channels` as they are (pixel space where the VAE cannot take
    them, a patch of the same model that divides the size); None where no model does."""
    patch, options, latent = preset(config.model).patch_size, [], config.latent
    if latent and (channels != 3 or size % (VaeCodec.downsample * patch)):
        options, latent = ["--vae none"], False
    options += [f"--image-size {size}"] if size != config.image_size else []
    options += [f"--channels {channels}"] if channels != config.channels else []
    unit = VaeCodec.downsample if latent else 1
    if size % (unit * patch):
        family = config.model.rpartition("/")[0]
        fits = [name for name in preset_names()
                if name.rpartition("/")[0] == family and size % (unit * preset(name).patch_size) == 0]
        if not fits:
            return None
        options.append(f"--model {fits[-1]}")  # the largest patch that fits: the fewest tokens
    return options


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


def preset_values(name: str, overrides: dict) -> dict:
    """The values --preset `name` gives, less the flow-only ones when `overrides` change the objective, and with a
    warm-up that fits a shortened run."""
    if name not in TRAIN_PRESETS:
        raise UserError(f"unknown training preset {name!r}", f"choose from {', '.join(TRAIN_PRESETS)}")
    preset = dict(TRAIN_PRESETS[name])
    if overrides.get("objective", preset.get("objective", "ddpm")) != preset.get("objective", "ddpm"):
        for flow_only in ("time_sampling", "time_shift", "time_direction"):  # the recipe's, not the user's
            preset.pop(flow_only, None)
    if "steps" in overrides and "lr_warmup" in preset and "lr_warmup" not in overrides:
        preset["lr_warmup"] = min(preset["lr_warmup"], overrides["steps"] // 10)  # a short trial run still decays
    return preset


def train_preset(name: str, **overrides) -> TrainConfig:
    return TrainConfig(**{**preset_values(name, overrides), **overrides})


def config_from_options(preset: str | None, stored: dict | None = None, **options) -> TrainConfig:
    """The TrainConfig of `dit train`: options left None take the --preset's value, else the `stored` settings of
    the run that --resume continues (ditcli.training.checkpoints.stored_settings), else TrainConfig's default.

    --vae takes an alias (ema, mse), an id or a folder; 'none' trains in pixel space.
    """
    vae = options.get("vae")
    chosen = {k: v for k, v in options.items() if v is not None}
    if vae is not None:
        chosen["vae"] = None if vae.lower() == "none" else VAE_ALIASES.get(vae, vae)
    base = dict(stored or {})
    if preset is not None:
        base.update(preset_values(preset, chosen))
    elif "data" not in chosen and not base.get("data"):
        raise UserError("no training data given", "pass --data FOLDER|FILE.npz|fashion-mnist, or --preset "
                        "fashion-mnist; --resume auto alone needs the --out of an existing run")
    config = TrainConfig(**{**base, **chosen})
    check_given(config, set(chosen))
    return config


# Options that act only with another: (fields, whether the run uses them, the option that makes it, what it does).
NEEDS = ((("eval_ref", "eval_num", "eval_features", "eval_sampler", "eval_steps", "eval_cfg"),
          lambda c: c.eval_every > 0, "--eval-every N", "evaluate"),
         (("train_omega", "train_kappa", "train_guidance_interval"), lambda c: c.train_guidance != "none",
          "--train-guidance meanflow, model or distill", "train guidance in"),
         (("teacher",), lambda c: c.train_guidance == "distill", "--train-guidance distill",
          "train towards a teacher's velocity"),
         (("init_weights",), lambda c: c.init_from is not None, "--init-from SRC", "start from another model"))


def check_given(config: TrainConfig, given: set[str]) -> None:
    """Options given on the command line that the run would not use are refused, never kept and recorded as if used;
    given at its default value counts (`--time-direction noise-to-data` trains no DDPM model any more than
    `data-to-noise` does). The stored settings a --resume takes are not checked again: they were the run's own."""
    flags = [f"--{name.replace('_', '-')}" for name in (*OBJECTIVE_SETTINGS, "schedule") if name in given]
    config.training_objective().check_training("linear", flags)
    for names, used, option, what in NEEDS:
        unused = [f"--{name.replace('_', '-')}" for name in names if name in given and not used(config)]
        if unused:
            raise UserError(f"{unused[0]} only applies with {option}, and this run does not {what}",
                            f"add {option.split(' or ')[0]}, or drop {unused[0]}")
