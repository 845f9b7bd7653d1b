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
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ditcli.commands.options import CompileOpt, DeviceOpt, DistTimeoutOpt, JsonOpt, SeedOpt
from ditcli.errors import UserError
from ditcli.model import preset_names
from ditcli.ranks import env_rank, world_size
from ditcli.training import TRAIN_PRESETS, Trainer, TrainConfig, train_preset

console = Console(stderr=True)


def train(
    data: Annotated[str | None, typer.Option("--data", help="Image folder (class sub-folders or flat), an .npz, "
                                                            "a folder of idx files, or 'fashion-mnist'.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory: checkpoints, metrics.jsonl, samples/.")] = Path(
        "runs/dit"),
    preset: Annotated[str | None, typer.Option("--preset", help=f"A ready recipe: {', '.join(TRAIN_PRESETS)}.")] = None,
    model: Annotated[str | None, typer.Option("--model", help=f"Architecture: {', '.join(preset_names())}.")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Training resolution in pixels.")] = None,
    channels: Annotated[int | None, typer.Option("--channels", help="Pixel-model channels (1 or 3).")] = None,
    vae: Annotated[str | None, typer.Option("--vae", help="ema, mse, a hub id or a local AutoencoderKL directory; "
                                                          "'none' trains in pixel space.")] = None,
    hidden_size: Annotated[int | None, typer.Option("--hidden-size", help="Custom width.")] = None,
    depth: Annotated[int | None, typer.Option("--depth", help="Custom number of blocks.")] = None,
    num_heads: Annotated[int | None, typer.Option("--num-heads", help="Custom number of heads.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Total optimizer steps.")] = None,
    global_batch: Annotated[int | None, typer.Option("--global-batch", help="Images per step, all ranks.")] = None,
    micro_batch: Annotated[int | None, typer.Option("--micro-batch",
                                                    help="Images per forward; the rest is accumulated.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW learning rate.")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay")] = None,
    ema_decay: Annotated[float | None, typer.Option("--ema-decay")] = None,
    ema_warmup: Annotated[bool | None, typer.Option("--ema-warmup/--no-ema-warmup")] = None,
    schedule: Annotated[str | None, typer.Option(
        "--schedule", help="Beta schedule: linear (DiT, the default) or cosine (IDDPM); recorded in every "
                           "checkpoint.")] = None,
    learn_sigma: Annotated[bool | None, typer.Option("--learn-sigma/--no-learn-sigma",
                                                     help="Learn the variance too (DiT, IDDPM's hybrid loss; "
                                                          "the default).")] = None,
    class_dropout_prob: Annotated[float | None, typer.Option(
        "--class-dropout-prob", help="Share of labels dropped to the null class, for guidance (default 0.1); 0 "
                                 "disables guidance.")] = None,
    grad_clip: Annotated[float | None, typer.Option("--grad-clip", help="Clip the gradient norm to this.")] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Random horizontal flips.")] = None,
    ckpt_every: Annotated[int | None, typer.Option("--ckpt-every")] = None,
    keep_last: Annotated[int | None, typer.Option("--keep-last")] = None,
    sample_every: Annotated[int | None, typer.Option("--sample-every", help="EMA sample grid every N steps.")] = None,
    log_every: Annotated[int | None, typer.Option("--log-every")] = None,
    max_bad_steps: Annotated[int | None, typer.Option("--max-bad-steps")] = None,
    grad_checkpointing: Annotated[bool | None, typer.Option("--grad-checkpointing/--no-grad-checkpointing")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="auto (latest in --out) or a ckpt-*.pt.")] = None,
    init_from: Annotated[str | None, typer.Option(
        "--init-from", help="Fine-tune: start from these weights (a .pt, .safetensors, training checkpoint, diffusers "
                            "folder or hub id org/name[@rev]); same architecture, any image size and classes.")] = None,
    init_weights: Annotated[str | None, typer.Option("--init-weights",
                                                     help="From training checkpoints: ema (default) or model.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even if the configuration differs.")] = False,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32 or bf16 (autocast, fp32 master "
                                                                      "weights).")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    compile: CompileOpt = False,
    json_out: JsonOpt = False,
    dist_timeout: DistTimeoutOpt = 600.0,
):
    """Train a DiT on an image folder, Fashion-MNIST or an .npz; resumable, mixed precision, torchrun-ready."""
    given = dict(data=data, out=str(out), model=model, image_size=image_size, channels=channels,
                 vae=_vae(vae), hidden_size=hidden_size, depth=depth, num_heads=num_heads, steps=steps,
                 global_batch=global_batch, micro_batch=micro_batch, lr=lr, weight_decay=weight_decay,
                 ema_decay=ema_decay, ema_warmup=ema_warmup, schedule=schedule, learn_sigma=learn_sigma,
                 class_dropout_prob=class_dropout_prob, grad_clip=grad_clip, flip=flip, ckpt_every=ckpt_every,
                 keep_last=keep_last, sample_every=sample_every, log_every=log_every, max_bad_steps=max_bad_steps,
                 grad_checkpointing=grad_checkpointing, precision=precision, seed=seed, device=device,
                 compile=compile, init_from=init_from, init_weights=init_weights)
    chosen = {k: v for k, v in given.items() if v is not None}
    if vae is not None and _vae(vae) is None:
        chosen["vae"] = None
    if preset is not None:
        config = train_preset(preset, **chosen)
    elif data is None:
        raise UserError("no training data given",
                        "pass --data FOLDER|FILE.npz|fashion-mnist, or --preset fashion-mnist")
    else:
        config = TrainConfig(**chosen)
    # Under torchrun all ranks compute and rank 0 renders; the others stay silent unless --debug.
    speaks = env_rank() == 0 or _debug()
    stop = threading.Event()
    _on_signals(stop, speaks)
    with TrainProgress(config, quiet=json_out or not speaks) as progress:
        result = Trainer(config, progress.on_event, stop.is_set, resume, force, dist_timeout=dist_timeout).run()
    if env_rank() != 0:
        return
    if json_out:
        typer.echo(json.dumps(result))
    elif result["interrupted"]:
        console.print(f"stopped at step {result['step']}; resume with: dit train ... --resume auto --out {config.out}")


def _vae(value: str | None) -> str | None:
    if value is None or value.lower() == "none":
        return None
    from ditcli.codec import VAE_ALIASES

    return VAE_ALIASES.get(value, value)


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


class TrainProgress:
    """Renders trainer events: the start-up table, a bar with loss and img/s, and one line per checkpoint."""

    def __init__(self, config: TrainConfig, quiet: bool):
        self.config, self.quiet = config, quiet
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(),
                                 TextColumn("step {task.completed}/{task.total}"),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet)
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.task is not None:
            self.progress.stop()

    def on_event(self, kind: str, data: dict):
        if kind == "start":
            self.show_summary(data)
            self.progress.start()
            self.task = self.progress.add_task("train", total=data["steps"], completed=data["start_step"], loss="-",
                                               rate="-")
        elif kind == "step" and self.task is not None:
            self.progress.update(self.task, completed=data["step"], loss=f"{data['loss']:.4f}",
                                 rate=f"{data['img_per_s']:.1f}")
        elif kind == "stop" and not self.quiet:
            self.progress.console.print(f"stop requested: every rank stops after step {data['step']}")
        elif kind in ("checkpoint", "sample", "resume", "cache", "warning", "skip") and not self.quiet:
            message = data.get("message") or f"{kind}: {data.get('path', '')} (step {data.get('step')})"
            self.progress.console.print(message)

    def show_summary(self, data: dict):
        if self.quiet:
            return
        table = Table(title="dit train", show_header=False)
        for key, value in data.items():
            if isinstance(value, float):
                text = f"{value:,.3f}"
            else:
                text = f"{value:,}" if isinstance(value, int) else str(value)
            table.add_row(key.replace("_", " "), text)
        self.progress.console.print(table)
