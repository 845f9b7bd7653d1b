"""`dit train`: builds a TrainConfig from options or a preset, runs the Trainer under a progress bar."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from ditcli.cli.options import CompileOpt, DeviceOpt, DistTimeoutOpt, JsonOpt
from ditcli.cli.progress import TrainProgress
from ditcli.model.dit import preset_names
from ditcli.ranks import env_rank, from_arguments, world_size
from ditcli.runtime import set_backend_flags
from ditcli.training.config import TRAIN_PRESETS, TrainConfig, config_from_options
from ditcli.training.trainer import Trainer

console = Console(stderr=True, soft_wrap=True)


def _opt(flags: str, help: str, field: str | None = None):
    """An option left None unless given, so that a --preset can fill it; `--help` shows TrainConfig's default."""
    value = TrainConfig.__dataclass_fields__[field].default if field else None
    if value is not None:
        shown = f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else value
        flag = flags.split("/")[0] if not isinstance(value, bool) or value else flags.split("/")[-1]
        help += f" Default: {flag if isinstance(value, bool) else shown}."
    return typer.Option(flags, help=help, show_default=False)


DataOpt = Annotated[str | None, _opt(
    "--data", "Image folder (class sub-folders or flat), an .npz, a folder of idx files, or 'fashion-mnist' (also "
              "fashion-mnist:test). Default: the --preset's; required without one.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Run directory: checkpoints, metrics.jsonl, samples/.")]
PresetOpt = Annotated[str | None, _opt("--preset", f"A ready recipe: {', '.join(TRAIN_PRESETS)}; other options "
                                                   "override its values. Default: none.")]
ModelOpt = Annotated[str | None, _opt("--model", f"Architecture: {', '.join(preset_names())}.", "model")]
ImageSizeOpt = Annotated[int | None, _opt("--image-size", "Training resolution in pixels.", "image_size")]
ChannelsOpt = Annotated[int | None, _opt("--channels", "Image channels: 1 (grayscale, pixel models only) or 3.",
                                         "channels")]
VaeOpt = Annotated[str | None, _opt("--vae", "ema, mse, a hub id or a local AutoencoderKL directory; 'none' trains in "
                                             "pixel space.", "vae")]
HiddenSizeOpt = Annotated[int | None, _opt("--hidden-size", "Transformer width (a multiple of 4 and of --num-heads). "
                                                            "Default: the --model's.", "hidden_size")]
DepthOpt = Annotated[int | None, _opt("--depth", "Number of DiT blocks. Default: the --model's.", "depth")]
NumHeadsOpt = Annotated[int | None, _opt("--num-heads", "Attention heads. Default: the --model's.", "num_heads")]
StepsOpt = Annotated[int | None, _opt("--steps", "Total optimizer steps.", "steps")]
GlobalBatchOpt = Annotated[int | None, _opt("--global-batch", "Images per step, all ranks.", "global_batch")]
MicroBatchOpt = Annotated[int | None, _opt("--micro-batch", "Images per forward; the rest of a rank's share is "
                                                            "accumulated. Default: the whole share.", "micro_batch")]
LrOpt = Annotated[float | None, _opt("--lr", "AdamW learning rate (> 0).", "lr")]
LrScheduleOpt = Annotated[str | None, _opt("--lr-schedule", "Learning rate after the warm-up: constant, or cosine "
                                                            "(annealed to 0 at --steps).", "lr_schedule")]
LrWarmupOpt = Annotated[int | None, _opt("--lr-warmup", "Steps of linear learning-rate warm-up from 0.", "lr_warmup")]
WeightDecayOpt = Annotated[float | None, _opt("--weight-decay", "AdamW weight decay (>= 0).", "weight_decay")]
EmaDecayOpt = Annotated[float | None, _opt("--ema-decay", "Decay of the EMA weights that sampling uses, in [0, 1).",
                                           "ema_decay")]
EmaWarmupOpt = Annotated[bool | None, _opt(
    "--ema-warmup/--no-ema-warmup", "Ramp the EMA decay up as min(decay, (1 + n) / (10 + n)).", "ema_warmup")]
ScheduleOpt = Annotated[str | None, _opt("--schedule", "Beta schedule: linear (DiT) or cosine (IDDPM); recorded in "
                                                       "every checkpoint.", "schedule")]
ObjectiveOpt = Annotated[str | None, _opt(
    "--objective", "ddpm (DiT: eps prediction on a beta schedule) or flow (SiT: velocity on the linear path x_t = "
                   "t x + (1 - t) eps); recorded in every checkpoint.", "objective")]
TimeDirectionOpt = Annotated[str | None, _opt(
    "--time-direction", "Flow time: noise-to-data (SiT: t = 1 is data) or data-to-noise (REPA, SD3).",
    "time_direction")]
TimeSamplingOpt = Annotated[str | None, _opt(
    "--time-sampling", "Flow training times: uniform (SiT) or logit-normal (mean 0, std 1; SD3, LightningDiT).",
    "time_sampling")]
TimeShiftOpt = Annotated[float | None, _opt(
    "--time-shift", "Flow training times shifted as s' = S s / (1 + (S - 1) s) on the noise level s (> 0; > 1 "
                    "trains more at high noise).", "time_shift")]
LearnSigmaOpt = Annotated[bool | None, _opt("--learn-sigma/--no-learn-sigma", "Learn the variance too (DiT, IDDPM's "
                                                                              "hybrid loss).", "learn_sigma")]
DropoutOpt = Annotated[float | None, _opt(
    "--class-dropout-prob", "Share of labels dropped to the null class, for guidance; 0 disables guidance.",
    "class_dropout_prob")]
GradClipOpt = Annotated[float | None, _opt("--grad-clip", "Clip the gradient norm to this (> 0); 0 does not clip. "
                                                          "Default: no clipping.", "grad_clip")]
FlipOpt = Annotated[bool | None, _opt("--flip/--no-flip", "Random horizontal flips.", "flip")]
CkptEveryOpt = Annotated[int | None, _opt("--ckpt-every", "Save a checkpoint every N steps (and at the end).",
                                          "ckpt_every")]
KeepLastOpt = Annotated[int | None, _opt("--keep-last", "Checkpoints kept; older ones are deleted.", "keep_last")]
SampleEveryOpt = Annotated[int | None, _opt("--sample-every", "EMA sample grid every N steps; 0 never.",
                                            "sample_every")]
LogOpt = Annotated[list[str] | None, _opt(
    "--log", "Experiment trackers besides metrics.jsonl (always written): tensorboard (OUT/tensorboard), wandb "
             "(honours WANDB_MODE=offline); repeat for several. Default: jsonl.")]
EvalEveryOpt = Annotated[int | None, _opt(
    "--eval-every", "Every N steps, sample --eval-num images from the EMA with the model's default sampler and log "
                    "their FD and KID against --eval-ref (dit fid's code); 0 never.", "eval_every")]
EvalRefOpt = Annotated[str | None, _opt("--eval-ref", "The reference .npz for --eval-every (dit fid --make-ref). "
                                                   "Default: none.")]
EvalNumOpt = Annotated[int | None, _opt("--eval-num", "Images per evaluation.", "eval_num")]
EvalFeaturesOpt = Annotated[str | None, _opt(
    "--eval-features", "Feature extractor, as dit fid --features (fashion-judge for Fashion-MNIST).", "eval_features")]
LogEveryOpt = Annotated[int | None, _opt("--log-every", "Append a metrics.jsonl row every N steps.", "log_every")]
MaxBadOpt = Annotated[int | None, _opt("--max-bad-steps", "Stop after this many consecutive steps with a non-finite "
                                                          "loss or gradient.", "max_bad_steps")]
GradCkptOpt = Annotated[bool | None, _opt("--grad-checkpointing/--no-grad-checkpointing", "Recompute block activations "
                                          "in the backward pass to save memory.", "grad_checkpointing")]
ResumeOpt = Annotated[str | None, _opt("--resume", "auto (latest in --out; with --init-from, the source on the first "
                                                   "run) or a ckpt-*.pt. Default: start afresh.")]
InitFromOpt = Annotated[str | None, _opt(
    "--init-from", "Fine-tune: start from these weights (a .pt, .safetensors, training checkpoint, diffusers folder "
                   "or hub id org/name[@rev]); same architecture, any image size and classes. Default: a fresh "
                   "model.")]
InitWeightsOpt = Annotated[str | None, _opt(
    "--init-weights", "Which weights of a dit train checkpoint --init-from reads: ema or model. Default: ema, or model "
                      "when the EMA record says the EMA is still mostly the initial weights.", "init_weights")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Resume even if the configuration differs.")]
PrecisionOpt = Annotated[str | None, _opt("--precision", "fp32 or bf16 (autocast, fp32 master weights).",
                                          "precision")]
SeedOpt = Annotated[int | None, _opt("--seed", "Seed of the weights and of every step's draws.", "seed")]


def train(
    data: DataOpt = None, out: OutOpt = Path("runs/dit"), preset: PresetOpt = None, model: ModelOpt = None,
    image_size: ImageSizeOpt = None, channels: ChannelsOpt = None, vae: VaeOpt = None,
    hidden_size: HiddenSizeOpt = None, depth: DepthOpt = None, num_heads: NumHeadsOpt = None, steps: StepsOpt = None,
    global_batch: GlobalBatchOpt = None, micro_batch: MicroBatchOpt = None, lr: LrOpt = None,
    lr_schedule: LrScheduleOpt = None, lr_warmup: LrWarmupOpt = None,
    weight_decay: WeightDecayOpt = None, ema_decay: EmaDecayOpt = None, ema_warmup: EmaWarmupOpt = None,
    schedule: ScheduleOpt = None, objective: ObjectiveOpt = None, time_direction: TimeDirectionOpt = None,
    time_sampling: TimeSamplingOpt = None, time_shift: TimeShiftOpt = None, learn_sigma: LearnSigmaOpt = None, class_dropout_prob: DropoutOpt = None,
    grad_clip: GradClipOpt = None, flip: FlipOpt = None, ckpt_every: CkptEveryOpt = None,
    keep_last: KeepLastOpt = None, sample_every: SampleEveryOpt = None, log_every: LogEveryOpt = None,
    log: LogOpt = None, eval_every: EvalEveryOpt = None, eval_ref: EvalRefOpt = None, eval_num: EvalNumOpt = None,
    eval_features: EvalFeaturesOpt = None,
    max_bad_steps: MaxBadOpt = None, grad_checkpointing: GradCkptOpt = None, resume: ResumeOpt = None,
    init_from: InitFromOpt = None, init_weights: InitWeightsOpt = None, force: ForceOpt = False,
    precision: PrecisionOpt = None, seed: SeedOpt = None, device: DeviceOpt = "auto", compile: CompileOpt = False,
    json_out: JsonOpt = False, dist_timeout: DistTimeoutOpt = 600.0,
):
    """Train a DiT on an image folder, Fashion-MNIST or an .npz; resumable, mixed precision, torchrun-ready.

    With --preset, the options you leave out take the preset's values instead of the defaults shown.
    """
    with from_arguments():  # the same options on every rank
        config = config_from_options(
            preset, data=data, out=str(out), model=model, image_size=image_size, channels=channels, vae=vae,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, steps=steps, global_batch=global_batch,
            micro_batch=micro_batch, lr=lr, lr_schedule=lr_schedule, lr_warmup=lr_warmup, weight_decay=weight_decay,
            ema_decay=ema_decay, ema_warmup=ema_warmup,
            schedule=schedule, objective=objective, time_direction=time_direction, time_sampling=time_sampling,
            time_shift=time_shift, learn_sigma=learn_sigma, class_dropout_prob=class_dropout_prob, grad_clip=grad_clip,
            flip=flip, ckpt_every=ckpt_every, keep_last=keep_last, sample_every=sample_every, log_every=log_every,
            log=tuple(dict.fromkeys(["jsonl", *log])) if log else None, eval_every=eval_every, eval_ref=eval_ref,
            eval_num=eval_num, eval_features=eval_features,
            max_bad_steps=max_bad_steps, grad_checkpointing=grad_checkpointing, precision=precision, seed=seed,
            device=device, compile=compile, init_from=init_from, init_weights=init_weights)
    set_backend_flags()  # TF32 and cuDNN autotuning, as the reference train.py enables them
    # Under torchrun all ranks compute and rank 0 renders; the others stay silent unless --debug.
    speaks = env_rank() == 0 or _debug()
    stop = threading.Event()
    _on_signals(stop, speaks)
    with TrainProgress(config, console, quiet=json_out or not speaks) as progress:
        result = Trainer(config, progress.on_event, stop.is_set, resume, force, dist_timeout=dist_timeout).run()
    if env_rank() != 0:
        return
    if json_out:
        typer.echo(json.dumps(result))
    elif result["interrupted"]:
        console.print(f"stopped at step {result['step']}; resume with: dit train ... --resume auto --out {config.out}")
    else:
        console.print(progress.final_line(result), highlight=False, soft_wrap=True)


def _debug() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


def _on_signals(stop: threading.Event, speaks: bool):
    """SIGINT/SIGTERM finish the current step, save a checkpoint and exit cleanly.

    The trainer all-reduces the request, so a signal that reaches one rank stops every rank at the same step. Alone,
    a second signal aborts at once; under torchrun it is ignored, since torchrun forwards the Ctrl-C that the workers
    already got, and kills them itself when they take too long.
    """
    def handler(signum, frame):
        if stop.is_set():
            if world_size() == 1:
                raise KeyboardInterrupt
            return
        stop.set()
        if speaks:
            console.print(f"rank {env_rank()} received {signal.Signals(signum).name}: saving a checkpoint at the end "
                          "of this step and stopping")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
