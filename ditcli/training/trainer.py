"""DiT training: resumable, mixed precision, data parallel, with bit-exact resume on CPU.

All randomness of a step (data order, timesteps, noise, label dropout, flips, posterior samples) is drawn for the
whole global batch from a generator seeded by (seed, step); each rank takes its slice. A run therefore gives the same
weights whatever the number of processes or the micro-batch, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ditcli.data.sources import ImageSet, check_source, is_idx_source, load_images
from ditcli.diffusion.samplers import (
    SamplingDefaults,
)
from ditcli.errors import UserError
from ditcli.hub import is_offline
from ditcli.io import check_creatable
from ditcli.model.codec import PixelCodec, VaeCodec, locate_vae
from ditcli.model.dit import DiT, DiTConfig, count_parameters, training_flops
from ditcli.ranks import (
    DEFAULT_TIMEOUT_S,
    SHARED_DISK_HINT,
    AgreedError,
    Ranks,
    collectives,
    from_rank0,
    join,
    leave,
    on_every_rank,
)
from ditcli.runtime import resolve_device, resolve_precision
from ditcli.training import finetune
from ditcli.training.align import (
    AlignBatch,
    Alignment,
    adopt_projectors,
    align_encoder,
    build_alignment,
    source_projectors,
)
from ditcli.training.checkpoints import (
    METRICS_FILE,
    RUN_FILE,
    Checkpoints,
    check_compatible,
    check_resume,
    train_state,
)
from ditcli.training.config import OBJECTIVE_SETTINGS, TrainConfig, check_image_shape
from ditcli.training.draws import StepDraws, TrainingData, draw_step
from ditcli.training.eval_hook import Evaluator, eval_config
from ditcli.training.latent_cache import LatentCache
from ditcli.training.net import RunNet
from ditcli.training.trackers import Trackers, check_packages
from ditcli.weights.ema import EmaRecord, ema_decay_at

NO_VAE = "pass --vae none to train in pixel space"  # the offline way out when a VAE cannot be had


@dataclass
class TrainState:
    """Counters that a checkpoint carries besides the tensors."""

    step: int = 0
    bad_steps: int = 0
    consecutive_bad: int = 0
    history: list = field(default_factory=list)


class Trainer:
    """One training run; `run()` is the orchestrator, the rest are its named steps."""

    def __init__(self, config: TrainConfig, on_event: Callable[[str, dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, resume: str | None = None, force: bool = False,
                 images: ImageSet | None = None, dist_timeout: float = DEFAULT_TIMEOUT_S):
        self.config = config
        self.preloaded = images
        self.emit = on_event or (lambda kind, data: None)
        self.should_stop = should_stop or (lambda: False)
        self.resume_arg, self.force = resume, force
        check_resume(resume, config.init_from)
        self.device = resolve_device(config.device)
        self.dist = join(self.device, dist_timeout, always=True)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if config.global_batch % self.dist.world:
            raise AgreedError(f"--global-batch {config.global_batch} is not divisible by {self.dist.world} processes")
        self.out = Path(config.out)
        self.dtype = resolve_precision(config.precision)

    def run(self) -> dict:
        """Train to `config.steps`, checkpointing and logging; returns a summary.

        Every branch below reads agreed state (the step counter, flags all-reduced in `train_step`), so all ranks
        enter the same collectives, save the same steps and stop together.
        """
        with self.group(), collectives(self.dist.rank, self.dist.world, self.dist.timeout_s, self.doing):
            self.setup()
            self.checkpoints.start({"train": self.config.to_dict(), "model": self.model_config.to_dict(),
                                    "data_fingerprint": self.images.fingerprint(), "start_step": self.state.step})
            self.emit("start", self.summary())
            started, images_seen = time.perf_counter(), 0
            while self.state.step < self.config.steps and not self.stopping:
                metrics = self.train_step()
                images_seen += self.config.global_batch
                metrics["img_per_s"] = images_seen / (time.perf_counter() - started - self.evaluator.seconds)
                self.log_metrics(metrics)
                self.maybe_sample()
                if self.evaluator.due(self.state.step):
                    self.evaluate()
                if self.checkpoints.due(self.state.step):
                    self.save_checkpoint()
            if self.stopping:
                self.emit("stop", {"step": self.state.step})
            if self.checkpoints.due(self.state.step, last=True):
                self.save_checkpoint()
            self.dist.barrier()  # leave together: no rank tears the group down under a peer still saving
        stale = self.ema_record().staleness()
        if stale is not None:
            self.emit("warning", {"message": f"warning: {stale}"})
        result = {"step": self.state.step, "bad_steps": self.state.bad_steps, "out": str(self.out),
                  "interrupted": self.state.step < self.config.steps}
        self.emit("done", result)
        return result

    @contextlib.contextmanager
    def group(self):
        """Leave the process group however the run ends."""
        try:
            yield
        finally:
            self.ddp = self.forward = self.net = None
            if getattr(self, "trackers", None) is not None:
                self.trackers.close()
            leave(self.dist)

    def doing(self) -> str:
        """What the ranks were doing together, for the error when a peer stops answering."""
        state = getattr(self, "state", None)
        return "setting up" if state is None else f"training step {state.step + 1}"

    # Set-up.

    def setup(self):
        config = self.config
        self.stopping = False
        agree_settings(config)  # --resume fills the options not given from the run folder, which each rank reads
        on_every_rank(lambda: check_creatable(self.out, "--out"), "cannot use --out", SHARED_DISK_HINT)
        self.evaluator = check_options(config, self.out, self.dist.rank)  # what the options name, before any write
        self.checkpoints = Checkpoints(self.out, config.ckpt_every, config.keep_last, self.dist, train_state(self))
        # The run folder, before anything is written: a run in it is only continued (rank 0 decides for all).
        resumed = self.checkpoints.agreed_resume(self.resume_arg)  # (payload, path), before anything is built
        restarted = None if resumed or self.resume_arg != "auto" else self.checkpoints.agreed_run_file()
        self.images = load_data(config, self.preloaded)
        if self.images.skipped:
            self.emit("warning", {"message": skipped_message(self.images.skipped), "files": self.images.skipped[:10]})
        self.model_config = config.model_config(self.images.num_classes)
        torch.manual_seed(config.seed)
        self.model = DiT(self.model_config).to(self.device)
        # --init-from starts a run once; a resumed run takes its weights from the checkpoint. Before the codec, so a
        # bad source fails before any latent is encoded.
        self.init = None if resumed else initialize_from(config, self.model, self.model_config, self.images, self.emit)
        self.model_config = self.init.config if self.init is not None else self.model_config
        self.ema_from_source = self.init is not None  # a resume reads it from the checkpoint's record
        self.teacher = None if config.teacher is None else on_every_rank(
            lambda: finetune.load_teacher(config.teacher, self.model_config, config.training_objective(),
                                          self.device), "cannot load --teacher")
        if restarted is not None:  # a run stopped before its first checkpoint starts again, with its settings
            on_every_rank(lambda: check_compatible(config, self.model_config, self.images, restarted,
                                                   self.out / RUN_FILE, restarted.get("data_fingerprint"), self.force))
        if resumed is not None:  # its stored forward and a check of its settings, before the latent cache is written
            self.adopt_checkpoint(*resumed)
        self.encoder = on_every_rank(lambda: align_encoder(config, self.device), "cannot load --align-encoder")
        self.codec = load_codec(config, self.device)
        cache = prepare_cache(self.images, self.codec, config, self.out, self.dist, self.emit)
        self.data = TrainingData(self.images, cache, config.flip)
        self.objective = config.build_objective()
        self.model.grad_checkpointing = config.grad_checkpointing
        self.ema = ema_copy(self.model, self.model_config, self.device)
        self.optimizer = adamw(self.model, config, self.device)
        self.alignment, self.head_optimizer = setup_alignment(config, self.model_config, self.encoder, self.ema,
                                                              self.objective, self.device, self.dtype, self.init,
                                                              self.emit)
        self.state = TrainState()
        if resumed is not None:
            self.load_checkpoint(*resumed)
        trained = self.model if self.alignment is None else self.alignment.wrap(self.model)  # with its heads
        self.ddp = data_parallel(trained, self.dist, self.device)
        self.forward = torch.compile(self.ddp) if config.compile else self.ddp
        self.net = RunNet(self.forward, self.model, self.device, self.dtype, tapped=self.alignment is not None,
                          teacher=self.teacher)
        self.out.mkdir(parents=True, exist_ok=True)
        self.trackers = on_every_rank(lambda: Trackers(tuple(config.log), self.out, self.state.step,
                                                       config.to_dict(), self.dist.rank))  # rank 0 opens them

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + ([self.head_optimizer] if self.head_optimizer is not None else [])

    def summary(self) -> dict:
        """The start-up table: what is trained on what, how, and where it goes."""
        c, m = self.config, self.model_config
        evaluation = {} if self.evaluator.request is None else {"evaluation": eval_text(c, self.eval_sampling())}
        return {"images": len(self.images), "classes": self.images.num_classes, "data": self.images.source,
                "model": f"{c.model} depth {m.depth} width {m.hidden_size} heads {m.num_heads} input {m.input_size}",
                "parameters": count_parameters(m), "train_gflops_per_image": training_flops(m) / 1e9,
                "codec": codec_text(self.codec.to_dict()), **recipe_rows(c), "global_batch": c.global_batch,
                "micro_batch": self.micro_batch, "precision": c.precision,
                "device": f"{self.device} x {self.dist.world}",
                "start_step": self.state.step, "steps": c.steps, **evaluation, "out": str(self.out),
                **({"alignment": self.alignment.describe()} if self.alignment else {}),
                **(self.init.summary() if self.init else {})}

    @property
    def micro_batch(self) -> int:
        per_rank = self.config.global_batch // self.dist.world
        return min(per_rank, self.config.micro_batch or per_rank)

    # One step.

    def train_step(self) -> dict:
        """Forward/backward over this rank's share of the global batch, then one guarded optimizer step."""
        config, world, rank = self.config, self.dist.world, self.dist.rank
        shape = (self.model_config.in_channels, self.model_config.input_size, self.model_config.input_size)
        draws = draw_step(config, self.state.step, len(self.data), shape, self.objective,
                          self.model_config.class_dropout_prob)
        per_rank = config.global_batch // world
        mine = draws.slice(rank * per_rank, (rank + 1) * per_rank)
        self.model.train()
        totals = dict.fromkeys(("loss", "mse", "vb", *(self.alignment.metrics if self.alignment else ())), 0.0)
        chunks = list(range(0, per_rank, self.micro_batch))
        for i, lo in enumerate(chunks):
            part = mine.slice(lo, lo + self.micro_batch)
            sync = i == len(chunks) - 1 or not self.dist.grouped
            with (self.ddp.no_sync() if not sync else contextlib.nullcontext()):
                terms = self.micro_step(part, per_rank)
            for k in totals:
                totals[k] += terms.get(k, 0.0)
        grad_norm = self.clip_gradients()
        finite = math.isfinite(grad_norm) and math.isfinite(totals["loss"])
        totals, ok, self.stopping = agree(self.dist, self.device, totals, finite, self.should_stop())
        self.apply_update(ok)
        return {**totals, "grad_norm": grad_norm, "skipped": not ok}

    def micro_step(self, part: StepDraws, per_rank: int) -> dict:
        x_start = self.data.x_start(part.indices, part.flips, part.posterior_noise).to(self.device)
        t, noise = part.t.to(self.device), part.noise.to(self.device)
        labels = torch.from_numpy(self.images.labels[part.indices]).to(self.device)
        drop = part.drop.to(self.device)
        terms = self.objective.loss(self.net, x_start, t, noise, labels, drop)
        if self.alignment is not None:  # on the tokens the differentiable forward tapped
            pixels = self.data.pixels(part.indices, part.flips).to(self.device)
            batch = AlignBatch(pixels, x_start, t, noise, labels, drop, part.shift.to(self.device))
            terms = self.alignment.add(terms, self.net.taps, batch)
        (terms["loss"].sum() / per_rank).backward()
        return {k: v.detach().sum().item() / per_rank for k, v in terms.items()}

    def clip_gradients(self) -> float:
        max_norm = self.config.grad_clip if self.config.grad_clip else float("inf")
        heads = [] if self.head_optimizer is None else list(self.alignment.heads.parameters())
        return float(torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *heads], max_norm))

    def apply_update(self, ok: bool):
        """Optimizer and EMA step, or a counted skip when the loss or gradient is not finite."""
        if ok:
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.config.lr_at(self.state.step)
                optimizer.step()
            update_ema(self.ema, self.model, ema_decay_at(self.config.ema_decay, self.config.ema_warmup,
                                                          self.state.step))
            self.state.consecutive_bad = 0
        else:
            self.state.bad_steps += 1
            self.state.consecutive_bad += 1
            self.emit("skip", {"step": self.state.step, "bad_steps": self.state.bad_steps})
            if self.state.consecutive_bad >= self.config.max_bad_steps:
                self.save_checkpoint()
                raise AgreedError(f"training diverged: {self.state.consecutive_bad} consecutive steps with a "
                                  f"non-finite loss or gradient at step {self.state.step}",
                                  "lower --lr, set --grad-clip, or use --precision fp32; the last good weights are in "
                                  "the latest checkpoint")
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    # Observability.

    def log_metrics(self, metrics: dict):
        step = self.state.step
        if step % self.config.log_every and step != self.config.steps:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
                  "lr": self.optimizer.param_groups[0]["lr"], "bad_steps": self.state.bad_steps,
                  "peak_mem_mb": _peak_memory_mb(self.device)}
        self.write_record("step", record, shown={"evals_left": self.evaluator.remaining(step, self.config.steps)})

    def maybe_sample(self):
        every = self.config.sample_every
        if not every or self.state.step % every or self.dist.rank != 0:
            return
        from ditcli.training.preview import ema_preview

        path = self.out / "samples" / f"step-{self.state.step:07d}.png"
        ema_preview(self.ema, self.codec, self.config.training_objective(), self.config.schedule, path,
                    self.config.seed, self.images.class_names)
        self.trackers.image(self.state.step, "ema_preview", path)
        self.emit("sample", {"path": str(path), "step": self.state.step})

    def evaluate(self):
        """FD (and KID) of the EMA, on every rank; the evaluator keeps its time out of img/s and calls back with
        its progress and warnings."""
        config = eval_config(self.model_config.num_classes, self.eval_sampling(), self.config.training_objective(),
                             self.config.schedule, self.config.eval_num, self.config.seed)
        record = self.evaluator(self.ema, self.codec, config, self.dist, self.device, self.state.step, self.emit)
        if record is not None:  # rank 0's
            self.write_record("eval", record, "eval")

    def write_record(self, kind: str, record: dict, group: str = "train", shown: dict | None = None):
        """Rank 0 appends `record` to metrics.jsonl and hands it to the trackers; every rank emits it as `kind`,
        with `shown` (for the progress display only)."""
        if self.dist.rank == 0:
            with open(self.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.scalars(record["step"], record, group)
        self.emit(kind, {**record, **(shown or {})})

    # Checkpoints.

    def save_checkpoint(self):
        """Every rank: rank 0 writes ckpt-<step>.pt from `train_state` (see ditcli.training.checkpoints)."""
        path = self.checkpoints.save(self.state.step)
        if path is not None:
            self.emit("checkpoint", {"path": str(path), "step": self.state.step})

    def adopt_checkpoint(self, data: dict, path: Path):
        """Before a resumed run builds or writes anything: its stored forward (a fine-tuned run keeps its source's),
        which the EMA then copies, and the check of its configuration against this run's."""
        stored = DiTConfig.from_dict(data["config"]["model"])
        self.model.set_forward(stored.timestep_convention, stored.norm_eps)
        self.model_config = self.model.config
        on_every_rank(lambda: check_compatible(self.config, self.model_config, self.images, data["config"], path,
                                               data.get("data_fingerprint"), self.force))

    def load_checkpoint(self, data: dict, path: Path):
        """Resume from `data`: every entry of the state, in the EMA the stored forward was adopted for."""
        stored = DiTConfig.from_dict(data["config"]["model"])
        self.ema.set_forward(stored.timestep_convention, stored.norm_eps)
        self.checkpoints.load(data, path)
        self.emit("resume", {"path": str(path), "step": self.state.step})

    def ema_record(self) -> EmaRecord:
        return EmaRecord(self.config.ema_decay, self.config.ema_warmup, self.state.step, self.ema_from_source)

    def sampling_defaults(self) -> SamplingDefaults:
        """What `dit sample` uses for this checkpoint unless told otherwise; no guidance without a null class."""
        trained = self.config.training_objective().trained_sampling
        return trained if self.guided else SamplingDefaults(trained.sampler, trained.steps, 1.0)

    def eval_sampling(self) -> SamplingDefaults:
        """How --eval-every samples: the checkpoint's defaults, changed by --eval-sampler, --eval-steps, --eval-cfg."""
        return self.evaluator.request.sampling(self.sampling_defaults(), self.guided)

    @property
    def guided(self) -> bool:
        """Whether the model has a null class to guide with."""
        return self.model_config.num_classes > 0 and self.model_config.class_dropout_prob > 0


# The parts `Trainer.setup` builds, in the order it builds them.

def check_options(config: TrainConfig, out: Path, rank: int) -> Evaluator:
    """What the options name outside the run, checked on every rank before the run folder is read or written: the
    trackers' packages, the evaluation's reference and (on rank 0, which scores) its feature extractor. A run refused
    here leaves every file as it found it. Returns the run's evaluator."""
    on_every_rank(lambda: check_packages(tuple(config.log)))
    evaluator = Evaluator.from_config(config, out)
    if evaluator.request is not None:
        on_every_rank(lambda: evaluator.request.check(load_extractor=rank == 0), "cannot evaluate as --eval-* asks",
                      SHARED_DISK_HINT)
    return evaluator


def initialize_from(config: TrainConfig, model: DiT, model_config: DiTConfig, images: ImageSet,
                    emit: Callable[[str, dict], None]) -> finetune.InitFrom | None:
    """--init-from: the source's weights replace `model`'s fresh ones (once, before training); EMA copies them."""
    if not config.init_from:
        return None
    init = finetune.init_from(config.init_from, model_config, model.state_dict(),
                              images.class_names, config.init_weights,
                              config.training_objective())
    finetune.apply(model, init)
    for note in init.notes:
        emit("warning", {"message": note})
    return init


def setup_alignment(config: TrainConfig, model_config: DiTConfig, encoder, ema: DiT, process, device: torch.device,
                    dtype: torch.dtype, init: finetune.InitFrom | None, emit: Callable[[str, dict], None]
                    ) -> tuple[Alignment | None, torch.optim.AdamW | None]:
    """--align and --dispersive (ditcli.training.align): the terms and their heads, with an optimizer of their own;
    an --init-from source's heads where it holds some that fit (a REPA checkpoint's projectors)."""
    alignment = build_alignment(config, model_config, encoder, ema, process, device, dtype)
    if alignment is None or alignment.heads is None:
        return alignment, None
    if init is not None:
        note = adopt_projectors(alignment.heads, source_projectors(config.init_from, init.weights), config.init_from)
        if note:
            emit("warning", {"message": note})
    return alignment, adamw(alignment.heads, config, device)


def ema_copy(model: DiT, config: DiTConfig, device: torch.device) -> DiT:
    """The EMA model: `model`'s weights, frozen, in eval mode."""
    ema = DiT(config).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    return ema


def adamw(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fused)


def data_parallel(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """DDP over the group's ranks (even one under torchrun); the model itself when run alone."""
    if not ranks.grouped:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def agree_settings(config: TrainConfig) -> None:
    """Every rank runs rank 0's settings (the run folder may differ: each rank checks its own later)."""
    theirs = from_rank0(config.to_dict())
    differ = [name for name, value in config.to_dict().items() if name != "out" and theirs[name] != value]

    def check() -> None:
        if differ:
            raise UserError(f"its settings differ from rank 0's ({', '.join(differ)})",
                            "start every rank with the same options; --resume takes those not given from --out, "
                            "which must be on a disk that all nodes share, at the same path")

    on_every_rank(check, "has other settings than rank 0")


def load_data(config: TrainConfig, preloaded: ImageSet | None) -> ImageSet:
    """The training images at --image-size and --channels: a folder or an .npz is cropped and resized to them; idx
    data (Fashion-MNIST) is read at its own size, so a run of another is refused, naming the options that fit it.

    Idx data is small and read first, so that this refusal comes before any VAE is looked for; other sources after
    their VAE is found, so that one that cannot be had fails in seconds, not after reading them all.
    """
    if preloaded is None:
        on_every_rank(lambda: check_source(config.data), "cannot read --data")
    as_stored = preloaded is None and is_idx_source(config.data)
    if not as_stored:
        locate_codec(config)

    def read() -> ImageSet:
        images = preloaded or load_images(config.data, config.image_size, config.channels)
        check_image_shape(config, images.images.shape, images.source)
        return images

    images = on_every_rank(read, "cannot read --data")
    if as_stored:
        locate_codec(config)
    return images


def recipe_rows(config: TrainConfig) -> dict[str, str]:
    """Start-up table rows: the objective (with the settings of its own not at their defaults), learning rate and
    EMA."""
    objective = config.training_objective()
    defaults = TrainConfig.__dataclass_fields__
    own = [f"{name.replace('_', ' ')} {getattr(config, name)}" for name in OBJECTIVE_SETTINGS
           if getattr(config, name) != defaults[name].default]
    sigma = ["learned sigma"] if config.learn_sigma else []
    end = f" to 0 at step {config.steps:,}" if config.lr_schedule == "cosine" else ""
    lr = [f"{config.lr:g}", config.lr_schedule + end]
    lr += [f"{config.lr_warmup:,} warm-up steps"] if config.lr_warmup else []
    lr += [f"weight decay {config.weight_decay:g}"] if config.weight_decay else []
    lr += [f"gradient clip {config.grad_clip:g}"] if config.grad_clip else []
    return {"objective": ", ".join([objective.describe(), *sigma, *own]),
            "schedule": objective.schedule_text(config.schedule), "learning_rate": ", ".join(lr),
            "ema": f"decay {config.ema_decay:g}" + (", warm-up" if config.ema_warmup else "")}


def codec_text(codec: dict) -> str:
    """A codec record as the start-up table shows it: "pixels, 1 channel (no VAE)", "VAE org/name, scale 0.18215"."""
    if codec.get("kind") == "pixel":
        channels = codec.get("channels", 3)
        return f"pixels, {channels} channel{'s' * (channels != 1)} (no VAE)"
    return f"VAE {codec.get('vae')}, latent scale {codec.get('scale', 0):g}"


def eval_text(config: TrainConfig, sampling: SamplingDefaults) -> str:
    """The start-up table's row for --eval-every."""
    return (f"every {config.eval_every:,} steps: {config.eval_num:,} images, {sampling.sampler} {sampling.steps} "
            f"steps, cfg {sampling.cfg:g}, {config.eval_features} features")


def locate_codec(config: TrainConfig) -> None:
    """A latent run's VAE is found (or refused) before the data is read."""
    if config.latent:
        locate_vae(config.vae, is_offline(), alternative=NO_VAE)


def load_codec(config: TrainConfig, device: torch.device):
    if not config.latent:
        return PixelCodec(config.channels)
    return VaeCodec.load(config.vae, device, offline=is_offline(), alternative=NO_VAE)


def prepare_cache(images: ImageSet, codec, config: TrainConfig, out: Path, ranks: Ranks,
                  emit: Callable[[str, dict], None]) -> LatentCache | None:
    """Latent models encode the data once into `out/latents`, reused while the VAE and data match."""
    if not config.latent:
        return None
    expected = {"vae": codec.name, "scale": codec.scale, "image_size": config.image_size,
                "fingerprint": images.fingerprint()}
    root = out / "latents"
    matches = on_every_rank(lambda: LatentCache.matches(root, expected) if ranks.rank == 0 else None)
    if not from_rank0(matches):
        emit("cache", {"message": f"encoding {len(images)} images (and flips) into {root}"})
        LatentCache.build(root, images, codec, expected, ranks.rank, ranks.world, barrier=ranks.barrier)
    return on_every_rank(lambda: LatentCache.open(root, expected),
                         f"cannot read the latent cache {root} that rank 0 wrote", SHARED_DISK_HINT)


# Pieces of one step that hold no state.

def agree(ranks: Ranks, device: torch.device, totals: dict, finite: bool, stop: bool) -> tuple[dict, bool, bool]:
    """One all-reduce per step: the mean metrics, whether every rank's step was finite, whether any rank was asked
    to stop (a signal reaches one rank, or torchrun's reaches all at different steps)."""
    if not ranks.grouped:
        return totals, finite, stop
    values = torch.tensor([*totals.values(), float(not finite), float(stop)], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    *means, bad, stops = (values / ranks.world).tolist()
    return dict(zip(totals, means)), bad == 0, stops > 0


@torch.no_grad()
def update_ema(ema: DiT, model: DiT, decay: float) -> None:
    """EMA of the weights in fp32; `decay` from `ema_decay_at` (the optional warm-up min(d, (1 + n) / (10 + n)))."""
    averaged = [p for p in ema.parameters() if p.dtype.is_floating_point]
    params = [p for p in model.parameters() if p.dtype.is_floating_point]
    torch._foreach_lerp_(averaged, params, 1.0 - decay)


def skipped_message(skipped: list[str], shown: int = 3) -> str:
    """"warning: skipped 5 unreadable or too-small files: a.png, b.png, c.png and 2 more"."""
    names = ", ".join(skipped[:shown]) + (f" and {len(skipped) - shown} more" if len(skipped) > shown else "")
    return f"warning: skipped {len(skipped)} unreadable or too-small files: {names}"


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        return 0.0
