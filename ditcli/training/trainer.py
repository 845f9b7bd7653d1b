"""DiT training: resumable, mixed precision, data parallel, with bit-exact resume on CPU.

All randomness of a step (data order, timesteps, noise, label dropout, flips, posterior samples) is drawn for the
whole global batch from a generator seeded by (seed, step); each rank takes its slice. A run therefore gives the same
weights whatever the number of processes or the micro-batch, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ditcli.data.sources import ImageSet, check_source, load_images
from ditcli.diffusion.objectives import ObjectiveSpec
from ditcli.diffusion.samplers import (
    TRAINED_FLOW_SAMPLING,
    TRAINED_SAMPLING,
    SamplingDefaults,
)
from ditcli.errors import UserError
from ditcli.hub import is_offline
from ditcli.io import atomic_write, check_creatable, safe_torch_load
from ditcli.model.codec import PixelCodec, VaeCodec, locate_vae
from ditcli.model.dit import DiT, DiTConfig, count_parameters, training_flops
from ditcli.ranks import (
    DEFAULT_TIMEOUT_S,
    SHARED_DISK_HINT,
    AgreedError,
    collectives,
    from_rank0,
    join,
    leave,
    on_every_rank,
)
from ditcli.runtime import autocast, resolve_device, resolve_precision
from ditcli.training import finetune
from ditcli.training.config import RESUMABLE_CHANGES, TrainConfig
from ditcli.training.draws import StepDraws, TrainingData, draw_step
from ditcli.training.eval_hook import EvalRequest, eval_config, evaluate_ema
from ditcli.training.latent_cache import LatentCache
from ditcli.training.trackers import Trackers
from ditcli.weights.checkpoint import TRAIN_FORMAT, train_ema_record
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
        if config.init_from and resume not in (None, "", "none", "auto"):
            raise UserError("--init-from and --resume CHECKPOINT exclude each other",
                            "pass --resume auto: it starts from --init-from once, then continues the run in --out")
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
            self.emit("start", self.summary())
            started, images_seen = time.perf_counter(), 0
            while self.state.step < self.config.steps and not self.stopping:
                metrics = self.train_step()
                images_seen += self.config.global_batch
                metrics["img_per_s"] = images_seen / (time.perf_counter() - started - self.eval_seconds)
                self.log_metrics(metrics)
                self.maybe_sample()
                self.maybe_evaluate()
                if self.state.step % self.config.ckpt_every == 0:
                    self.save_checkpoint()
            if self.stopping:
                self.emit("stop", {"step": self.state.step})
            if self.saved_step != self.state.step:
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
            self.ddp = self.forward = None
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
        self.stopping, self.saved_step = False, -1
        on_every_rank(lambda: check_creatable(self.out, "--out"), "cannot use --out", SHARED_DISK_HINT)
        resume_from = self.agreed_resume()
        resumed = self.read_resume(*resume_from) if resume_from is not None else None  # before anything is built
        if self.preloaded is None:
            on_every_rank(lambda: check_source(config.data), "cannot read --data")
        self.locate_codec()  # before the data: a VAE that cannot be had fails in seconds, not after reading it all
        self.images = self.preloaded or on_every_rank(
            lambda: load_images(config.data, config.image_size, config.channels), "cannot read --data")
        if self.images.skipped:
            self.emit("warning", {"message": skipped_message(self.images.skipped), "files": self.images.skipped[:10]})
        self.model_config = config.model_config(self.images.num_classes)
        torch.manual_seed(config.seed)
        self.model = DiT(self.model_config).to(self.device)
        # --init-from starts a run once; a resumed run takes its weights from the checkpoint. Before the codec, so a
        # bad source fails before any latent is encoded.
        self.init = None if resumed else self.initialize_from()
        self.ema_from_source = self.init is not None  # a resume reads it from the checkpoint's record
        self.codec = self.load_codec()
        cache = self.prepare_cache()
        self.data = TrainingData(self.images, cache, config.flip)
        self.objective = config.build_objective()
        self.model.grad_checkpointing = config.grad_checkpointing
        self.ema = DiT(self.model_config).to(self.device).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        fused = {"fused": True} if self.device.type in ("cuda", "cpu") else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           **fused)
        self.state = TrainState()
        if resumed is not None:
            self.load_checkpoint(resumed, resume_from[0])
        self.ddp = self.model
        if self.dist.grouped:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.ddp) if config.compile else self.ddp
        self.out.mkdir(parents=True, exist_ok=True)
        self.eval_seconds, self.eval_reference = 0.0, {}  # the reference's activations, extracted once
        self.evaluation = None if not config.eval_every else EvalRequest(
            config.eval_every, Path(config.eval_ref), config.eval_num, config.eval_features)
        if self.evaluation is not None:
            on_every_rank(self.evaluation.check, "cannot read --eval-ref", SHARED_DISK_HINT)
        self.trackers = on_every_rank(lambda: Trackers(tuple(config.log), self.out, self.state.step,
                                                       config.to_dict(), self.dist.rank))  # rank 0 opens them

    def initialize_from(self) -> finetune.InitFrom | None:
        """--init-from: the source's weights replace the fresh ones (once, before training); EMA copies them."""
        if not self.config.init_from:
            return None
        config = self.config
        init = finetune.init_from(config.init_from, self.model_config, self.model.state_dict(),
                                  self.images.class_names, config.init_weights,
                                  ObjectiveSpec.from_record(config.objective, config.time_direction, "run"))
        finetune.apply(self.model, init)
        for note in init.notes:
            self.emit("warning", {"message": note})
        self.model_config = init.config
        return init

    def locate_codec(self) -> None:
        if self.config.latent:
            locate_vae(self.config.vae, is_offline(), alternative=NO_VAE)

    def load_codec(self):
        config = self.config
        if not config.latent:
            return PixelCodec(config.channels)
        return VaeCodec.load(config.vae, self.device, offline=is_offline(), alternative=NO_VAE)

    def prepare_cache(self) -> LatentCache | None:
        """Latent models encode the data once into `out/latents`, reused while the VAE and data match."""
        codec, config = self.codec, self.config
        if not config.latent:
            return None
        expected = {"vae": codec.name, "scale": codec.scale, "image_size": config.image_size,
                    "fingerprint": self.images.fingerprint()}
        root = self.out / "latents"
        matches = on_every_rank(lambda: LatentCache.matches(root, expected) if self.dist.rank == 0 else None)
        if not from_rank0(matches):
            self.emit("cache", {"message": f"encoding {len(self.images)} images (and flips) into {root}"})
            LatentCache.build(root, self.images, codec, expected, self.dist.rank, self.dist.world,
                              barrier=self.dist.barrier)
        return on_every_rank(lambda: LatentCache.open(root, expected),
                             f"cannot read the latent cache {root} that rank 0 wrote", SHARED_DISK_HINT)

    def summary(self) -> dict:
        c, m = self.config, self.model_config
        return {"images": len(self.images), "classes": self.images.num_classes, "data": self.images.source,
                "model": f"{c.model} depth {m.depth} width {m.hidden_size} heads {m.num_heads} input {m.input_size}",
                "parameters": count_parameters(m), "train_gflops_per_image": training_flops(m) / 1e9,
                "global_batch": c.global_batch, "micro_batch": self.micro_batch, "precision": c.precision,
                "device": f"{self.device} x {self.dist.world}", "start_step": self.state.step, "steps": c.steps,
                "codec": self.codec.to_dict(), **(self.init.summary() if self.init else {})}

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
        totals = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
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
        totals, ok, self.stopping = self.agree(totals, finite, self.should_stop())
        self.apply_update(ok)
        return {**totals, "grad_norm": grad_norm, "skipped": not ok}

    def micro_step(self, part: StepDraws, per_rank: int) -> dict:
        x_start = self.data.x_start(part.indices, part.flips, part.posterior_noise).to(self.device)
        t, noise = part.t.to(self.device), part.noise.to(self.device)
        labels = torch.from_numpy(self.images.labels[part.indices]).to(self.device)
        x_t = self.objective.q_sample(x_start, t, noise)
        with autocast(self.device, self.dtype):
            out = self.forward(x_t, t, labels, part.drop.to(self.device))
        terms = self.objective.training_losses(out.float(), x_start, x_t, t, noise)
        (terms["loss"].sum() / per_rank).backward()
        return {k: v.detach().sum().item() / per_rank for k, v in terms.items()}

    def clip_gradients(self) -> float:
        max_norm = self.config.grad_clip if self.config.grad_clip else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def apply_update(self, ok: bool):
        """Optimizer and EMA step, or a counted skip when the loss or gradient is not finite."""
        if ok:
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr_at(self.state.step)
            self.optimizer.step()
            self.update_ema()
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
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    @torch.no_grad()
    def update_ema(self):
        """EMA of the weights in fp32, with the optional warm-up decay min(d, (1 + n) / (10 + n))."""
        decay = ema_decay_at(self.config.ema_decay, self.config.ema_warmup, self.state.step)
        ema = [p for p in self.ema.parameters() if p.dtype.is_floating_point]
        params = [p for p in self.model.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(ema, params, 1.0 - decay)

    def agree(self, totals: dict, finite: bool, stop: bool) -> tuple[dict, bool, bool]:
        """One all-reduce per step: the mean metrics, whether every rank's step was finite, whether any rank was
        asked to stop (a signal reaches one rank, or torchrun's reaches all at different steps)."""
        if not self.dist.grouped:
            return totals, finite, stop
        values = torch.tensor([*totals.values(), float(not finite), float(stop)], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(values)
        *means, bad, stops = (values / self.dist.world).tolist()
        return dict(zip(totals, means)), bad == 0, stops > 0

    # Observability.

    def log_metrics(self, metrics: dict):
        step = self.state.step
        if step % self.config.log_every and step != self.config.steps:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
                  "lr": self.optimizer.param_groups[0]["lr"], "bad_steps": self.state.bad_steps,
                  "peak_mem_mb": _peak_memory_mb(self.device)}
        if self.dist.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.scalars(step, record)
        self.emit("step", record)

    def maybe_sample(self):
        every = self.config.sample_every
        if not every or self.state.step % every or self.dist.rank != 0:
            return
        from ditcli.training.preview import ema_preview

        path = self.out / "samples" / f"step-{self.state.step:07d}.png"
        ema_preview(self.ema, self.codec, self.objective, self.config.schedule, path, self.config.seed)
        self.trackers.image(self.state.step, "ema_preview", path)
        self.emit("sample", {"path": str(path), "step": self.state.step})

    def maybe_evaluate(self):
        """FD (and KID) of the EMA at every --eval-every step, on every rank; its time is kept out of img/s."""
        if self.evaluation is None or not self.evaluation.due(self.state.step):
            return
        started, step = time.perf_counter(), self.state.step
        config = eval_config(self.model_config.num_classes, self.sampling_defaults(),
                             ObjectiveSpec.from_record(self.config.objective, self.config.time_direction, "run"),
                             self.config.schedule, self.config.eval_num, self.config.seed)
        path = self.out / "eval" / f"step-{step:07d}.npz"
        record = evaluate_ema(self.ema, self.codec, config, self.evaluation, path, self.dist, self.device, step,
                              self.eval_reference)
        self.eval_seconds += time.perf_counter() - started
        if record is None:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.scalars(step, record, "eval")
        self.emit("eval", record)

    # Checkpoints.

    def checkpoints(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.out.glob("ckpt-*.pt") if (m := re.match(r"ckpt-(\d+)\.pt", p.name))]
        return sorted(found)

    def agreed_resume(self) -> tuple[Path, int] | None:
        """Rank 0 picks the checkpoint and its step from its run folder; every rank then loads that one."""
        def choose() -> int | None:
            path = self.find_resume() if self.dist.rank == 0 else None
            return None if path is None else _checkpoint_step(path)

        step = from_rank0(on_every_rank(choose))
        if step is None:
            return None
        path = self.out / f"ckpt-{step:07d}.pt" if self.resume_arg == "auto" else Path(self.resume_arg)
        return path, step

    def find_resume(self) -> Path | None:
        if self.resume_arg in (None, "", "none"):
            return None
        if self.resume_arg == "auto":
            found = self.checkpoints()
            return found[-1][1] if found else None
        path = Path(self.resume_arg)
        if not path.exists():
            raise UserError(f"resume checkpoint not found: {path}", "pass --resume auto or an existing ckpt-*.pt")
        return path

    def save_checkpoint(self):
        """Atomically write ckpt-<step>.pt on rank 0 and keep the last `keep_last`."""
        rng = self.gather_rng_states()
        self.saved_step = self.state.step
        if self.dist.rank != 0:
            return
        payload = {"format": TRAIN_FORMAT, "step": self.state.step,
                   "epoch": self.state.step // max(1, len(self.data) // self.config.global_batch),
                   "position": (self.state.step % max(1, len(self.data) // self.config.global_batch))
                   * self.config.global_batch,
                   "config": {"model": self.model_config.to_dict(), "train": self.config.to_dict()},
                   "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                   "optimizer": self.optimizer.state_dict(), "rng": rng, "bad_steps": self.state.bad_steps,
                   "class_names": self.images.class_names, "codec": self.codec.to_dict(),
                   "sampling": self.sampling_defaults().to_dict(), "ema_record": self.ema_record().to_dict(),
                   "data_fingerprint": self.images.fingerprint(),
                   "versions": {"torch": str(torch.__version__), "ditcli": _version()}}
        path = self.out / f"ckpt-{self.state.step:07d}.pt"
        atomic_write(path, lambda tmp: torch.save(payload, tmp), force=True)
        for _, old in self.checkpoints()[: -self.config.keep_last]:
            old.unlink(missing_ok=True)
        self.emit("checkpoint", {"path": str(path), "step": self.state.step})

    def ema_record(self) -> EmaRecord:
        return EmaRecord(self.config.ema_decay, self.config.ema_warmup, self.state.step, self.ema_from_source)

    def sampling_defaults(self) -> SamplingDefaults:
        """What `dit sample` uses for this checkpoint unless told otherwise; no guidance without a null class."""
        guided = self.model_config.num_classes > 0 and self.model_config.class_dropout_prob > 0
        trained = TRAINED_FLOW_SAMPLING if self.objective.kind == "flow" else TRAINED_SAMPLING
        return trained if guided else SamplingDefaults(trained.sampler, trained.steps, 1.0)

    def gather_rng_states(self) -> list:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.dist.grouped:
            return [state]
        gathered = [None] * self.dist.world
        dist.all_gather_object(gathered, state)
        return gathered

    def read_resume(self, path: Path, step: int) -> dict:
        """The checkpoint rank 0 resumes from, read on every rank before anything is built; a rank that cannot
        read it stops them all."""
        return on_every_rank(lambda: read_train_checkpoint(path, step),
                             f"cannot read the checkpoint {path} that rank 0 resumes from", SHARED_DISK_HINT)

    def load_checkpoint(self, data: dict, path: Path):
        stored = DiTConfig.from_dict(data["config"]["model"])  # a fine-tuned run keeps its source's forward
        for model in (self.model, self.ema):
            model.set_forward(stored.timestep_convention, stored.norm_eps)
        self.model_config = self.model.config
        on_every_rank(lambda: self.check_compatible(data["config"], path, data.get("data_fingerprint")))
        self.model.load_state_dict(data["model"])
        self.ema.load_state_dict(data["ema"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.state.step, self.state.bad_steps = int(data["step"]), int(data.get("bad_steps", 0))
        self.saved_step = self.state.step
        self.ema_from_source = bool((record := train_ema_record(data)) and record.from_source)
        self.restore_rng_states(data.get("rng") or [])
        if self.dist.rank == 0:
            trim_metrics(self.out / "metrics.jsonl", self.state.step)
        self.emit("resume", {"path": str(path), "step": self.state.step})

    def restore_rng_states(self, states: list):
        """This rank's saved generators: the CPU's, and on CUDA the GPU's where the checkpoint holds it."""
        if len(states) <= self.dist.rank:
            return
        state = states[self.dist.rank]
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def check_compatible(self, stored: dict, path: Path, fingerprint: str | None = None):
        ours = self.config.to_dict()
        defaults = TrainConfig.__dataclass_fields__  # a field added since the checkpoint was written has its default
        before = {k: stored["train"].get(k, defaults[k].default) for k in ours}
        differs = [f"{k}: {before[k]!r} -> {v!r}" for k, v in ours.items()
                   if k not in RESUMABLE_CHANGES and k not in ("out", "data") and before[k] != v]
        if self.config.init_from and _source_key(before["init_from"]) != _source_key(self.config.init_from):
            differs.append(f"init_from: {before['init_from']!r} -> {self.config.init_from!r}")  # another run's folder
        if not self.same_data(stored["train"].get("data"), fingerprint):
            differs.append(f"data: {stored['train'].get('data')!r} -> {self.config.data!r}")
        if DiTConfig.from_dict(stored["model"]) != self.model_config:
            differs.append("model architecture")
        if differs and not self.force:
            raise UserError(f"cannot resume from {path}: the configuration differs ({'; '.join(differs)})",
                            "use the original settings, or pass --force to resume anyway")

    def same_data(self, stored: str | None, fingerprint: str | None) -> bool:
        """The data's fingerprint decides (`pngs` and `./pngs/` are one folder); older checkpoints compare paths."""
        if fingerprint is not None:
            return fingerprint == self.images.fingerprint()
        return stored is not None and _data_path(stored) == _data_path(self.config.data)


def _data_path(data: str) -> str:
    return data if data.startswith("fashion-mnist") else str(Path(data).expanduser().resolve())


def _source_key(source: str | None) -> str | None:
    """An --init-from source as compared on resume: local files by resolved path, hub ids as written."""
    if source is None or not Path(source).expanduser().exists():
        return source
    return str(Path(source).expanduser().resolve())


def read_train_checkpoint(path: Path, step: int | None = None) -> dict:
    """A complete training checkpoint's payload; `step`, if given, must be the one it holds."""
    data = safe_torch_load(path)
    if not isinstance(data, dict) or data.get("format") != TRAIN_FORMAT or not all(
            isinstance(data.get(k), dict) for k in ("config", "model", "ema", "optimizer")):
        raise UserError(f"{path} is not a complete ditcli training checkpoint",
                        "resume needs a ckpt-*.pt written by dit train")
    if step is not None and int(data["step"]) != step:
        raise UserError(f"{path} holds step {data['step']}, not step {step} as on rank 0")
    return data


def _checkpoint_step(path: Path) -> int:
    """The step a checkpoint holds: from its ckpt-<step>.pt name, else from its payload."""
    match = re.fullmatch(r"ckpt-(\d+)\.pt", Path(path).name)
    return int(match.group(1)) if match else int(read_train_checkpoint(path)["step"])


def skipped_message(skipped: list[str], shown: int = 3) -> str:
    """"warning: skipped 5 unreadable or too-small files: a.png, b.png, c.png and 2 more"."""
    names = ", ".join(skipped[:shown]) + (f" and {len(skipped) - shown} more" if len(skipped) > shown else "")
    return f"warning: skipped {len(skipped)} unreadable or too-small files: {names}"


def trim_metrics(path: Path, step: int) -> None:
    """Drop the rows an interrupted run logged after the checkpoint it resumes from, and any torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)), force=True)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        return 0.0


def _version() -> str:
    from ditcli import __version__

    return __version__
