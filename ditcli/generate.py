"""Sampling a DiT into images, edm2-style: `generate_images()` yields batches and the writers put them on disk.

Image i of a run depends only on the run's settings and i: its class, starting noise and step noise come from
generators seeded by (seed, i). So batches can be any size, ranks can split the indices any way, and a re-run can skip
the images an earlier run finished. Nothing here prints; progress goes through callbacks.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import statistics
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ditcli.aot import AotCompiled
from ditcli.cache import ROW_QUANTUM, BlockCache, check_threshold
from ditcli.codec import to_uint8
from ditcli.errors import UserError
from ditcli.model import DiTConfig, forward_macs
from ditcli.objectives import DDPM, ObjectiveSpec
from ditcli.ranks import Ranks, from_rank0, on_every_rank
from ditcli.runtime import autocast, resolve_precision
from ditcli.samplers import (CountingModelFn, FlowSettings, Guidance, ImageNoise, SamplerPlan, guided_model_fn,
                             image_seed, plan_for, unconditional_model_fn)
from ditcli.weights import home_dir

ADDED_FIELDS = ("objective", "flow", "cache")
LABEL_STREAM = 0x1ABE1  # keeps the label draws apart from the noise draws of the same (seed, index)
StepFn = Callable[[int, int], None] | None


@dataclass(frozen=True)
class GenerateConfig:
    """Everything that decides the pixels of a run, plus the batch size and compile flag, which must not."""

    labels: tuple[int, ...]
    seed: int = 0
    sampler: str = "ddpm"
    steps: int = 250
    eta: float = 0.0
    guidance: Guidance = Guidance()
    batch_size: int = 16
    precision: str = "fp32"
    compile: bool = False
    schedule: str = "linear"  # the checkpoint's training betas
    objective: ObjectiveSpec = DDPM  # the checkpoint's objective and time direction
    flow: FlowSettings = FlowSettings()  # a flow sampler's time shift, tolerances and last step
    cache: float | None = None  # `BlockCache`'s threshold; None runs every block without it

    def __post_init__(self):
        if not self.labels:
            raise ValueError("nothing to sample: the run has 0 images (use --num N or --num-per-class N with N >= 1)")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        check_threshold(self.cache)
        if self.cache is not None and self.compile:
            raise ValueError("--cache runs the blocks one at a time, eagerly: drop --compile")

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def plan(self, learn_sigma: bool) -> SamplerPlan:
        """The sampler on the checkpoint's own process: its betas, or its flow's time direction."""
        process = self.objective.build(learn_sigma=learn_sigma, schedule=self.schedule)
        return plan_for(process, self.sampler, self.steps, schedule=self.schedule, eta=self.eta, flow=self.flow)

    def run_key(self, checkpoint_sha256: str, codec: dict) -> str:
        """A digest of what decides the pixels; a re-run resumes only a run with the same key."""
        fields = asdict(self)
        fields.pop("batch_size"), fields.pop("compile")
        unset = {"cache": not self.cache}  # threshold 0 gives the uncached pixels
        for name in ADDED_FIELDS:  # hashed only where set, so runs from before them keep their keys
            if unset.get(name, getattr(self, name) == GenerateConfig.__dataclass_fields__[name].default):
                fields.pop(name)
        fields["labels"] = hashlib.sha256(np.asarray(self.labels, dtype=np.int64).tobytes()).hexdigest()
        fields.update(checkpoint=checkpoint_sha256, codec=codec)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def class_labels(classes: Sequence[int], num_per_class: int) -> list[int]:
    """`num_per_class` images of each class in turn: one grid row per class."""
    return [c for c in classes for _ in range(num_per_class)]


def random_labels(num: int, seed: int, choices: Sequence[int]) -> list[int]:
    """Uniform random classes; image i draws from its own generator, so its class does not depend on `num`."""
    return [choices[int(np.random.default_rng([LABEL_STREAM, image_seed(seed, i)]).integers(len(choices)))]
            for i in range(num)]


@dataclass
class Batch:
    """A finished batch: image indices, their classes and uint8 images (N, H, W, C) on the CPU."""

    indices: list[int]
    labels: list[int]
    images: torch.Tensor
    nfe: int
    reused: float = 0.0  # of the `nfe` evaluations, how many (in rows' worth) reused `BlockCache`'s deep blocks


class CastWeights(torch.nn.Module):
    """A DiT run from weights cast once to bf16 or fp16, with no per-forward autocast.

    Its input is cast on the way in and its output returned in float32, so the sampler's state and the guidance
    arithmetic stay fp32; the timestep features are computed in fp32 inside the embedder, before its first linear.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = model if weights_dtype(model) == dtype else cast_copy(model, dtype)
        self.config, self.dtype = model.config, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype), t, y).float()


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` whose floating-point tensors are cast to `dtype`, made without first copying them in their
    own dtype (what `deepcopy(model).to(dtype)` does: 1.4 s of an fp32 DiT-B/2's start-up on a CPU, against 0.4 s)."""
    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach().clone()

    memo = {id(p): torch.nn.Parameter(cast(p), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): cast(b) for b in model.buffers()})
    return copy.deepcopy(model, memo)


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def inference_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model a run of `precision` calls: itself in fp32, else a `CastWeights` copy (made once per run)."""
    dtype = resolve_precision(precision)
    if dtype == torch.float32 or (isinstance(model, CastWeights) and model.dtype == dtype):
        return model
    return CastWeights(model, dtype)


# `--compile auto`: compile when the eager forwards of the job are long enough to repay the compilation. The figures
# are measured on 2-core CPUs at 2 threads (docs/benchmarks.md): building the AOTInductor package of a DiT forward took
# 45 s for the embedded model and 42 s for DiT-B/2, and loading a package an earlier run built about 4 s (2 s of them
# torch's probe of the CPU's vector ISA). Eager forwards ran at about 200 GMAC/s in bf16 and 85 in fp32 on a Xeon with
# AMX, where freezing saved a third of a bf16 forward (DiT-B/2, batch 4: 442 -> 294 ms); on an AMD EPYC with AVX-512
# BF16 and no AMX at about 120 and 55, where freezing saved 13% (B/2 and XL/2 alike). GPUs are credited 100x the AMX
# rates, the AMX saving and 60 s of compilation (torch.compile has no package to load).
COMPILE_SECONDS = {"cpu": 45.0, "cuda": 60.0}
LOAD_SECONDS = {"cpu": 4.0}
EAGER_MACS_PER_S = {"amx": {"bf16": 200e9, "fp16": 200e9, "fp32": 85e9},
                    "other": {"bf16": 120e9, "fp16": 120e9, "fp32": 55e9}}
COMPILE_SAVING = {"amx": 1 / 3, "other": 0.13}
GPU_SPEEDUP = 100.0


@functools.cache
def cpu_kind() -> str:
    """"amx" on a CPU with AMX tiles for bf16, else "other" (the rates above); from /proc/cpuinfo where there is one."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "other"
    return "amx" if "amx_bf16" in flags else "other"


def compile_pays(config: GenerateConfig, model_config: DiTConfig, nfe: int | None, device: torch.device,
                 built: bool = False) -> tuple[bool, str]:
    """Whether `--compile auto` compiles this job, and why, from the job's forward MACs at the measured rates.
    `built`: an earlier run left the package, so compiling costs only its loading (CPU)."""
    passes = 2 if config.guidance.scale not in (0.0, 1.0) else 1  # a guided step runs the doubled batch
    rows = -(-config.num_images // batch_width(config)) * batch_width(config) * passes
    macs = forward_macs(model_config) * rows * (nfe or config.steps)
    kind = "amx" if device.type == "cuda" else cpu_kind()
    rate = EAGER_MACS_PER_S[kind].get(config.precision, EAGER_MACS_PER_S[kind]["fp32"])
    rate *= GPU_SPEEDUP if device.type == "cuda" else 1.0
    eager = macs / rate
    loads = built and device.type in LOAD_SECONDS
    cost = LOAD_SECONDS[device.type] if loads else COMPILE_SECONDS.get(device.type, COMPILE_SECONDS["cuda"])
    saved = eager * COMPILE_SAVING[kind]
    verdict = saved > cost
    paying = "loading the package an earlier run built" if loads else "compilation"
    if not loads and device.type in LOAD_SECONDS:
        paying += f" (or {LOAD_SECONDS[device.type]:.0f} s to load a package an earlier run built)"
    return verdict, (f"{'compiled' if verdict else 'eager'}: the job's forwards take about {eager:.0f} s eager, "
                     f"compiling would save about {saved:.0f} s for about {cost:.0f} s of {paying}")


def compiled(model: torch.nn.Module, autotune: bool = False) -> torch.nn.Module:
    """torch.compile for sampling: inductor freezing folds the (inference-only) weights into the graph; compiled
    artifacts are cached in the user cache folder (TORCHINDUCTOR_CACHE_DIR, unless set), so a rerun pays less.
    `autotune` adds what mode="max-autotune" turns on, kernel autotuning and CUDA graphs (GPU benchmarks only: its
    compile time is not yet measured, so `dit sample` does not use it)."""
    inductor_cache_in_home()
    tuning = {"max_autotune": True, "triton.cudagraphs": True} if autotune else {}
    return torch.compile(model, options={"freezing": True, **tuning})


def compiled_for(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The compiled forward of a sampling run: on a CPU an AOTInductor package kept in the home directory across
    runs (`ditcli.aot`: built once, then loaded in seconds), elsewhere `compiled`."""
    if device.type == "cpu":
        inductor_cache_in_home()
        return AotCompiled(model, home_dir() / "aoti")
    return compiled(model)


def inductor_cache_in_home() -> None:
    """Inductor's caches go to the home directory (TORCHINDUCTOR_CACHE_DIR, unless the user set it)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its own default into the variable the first time it looks, so that value counts as unset.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(home_dir() / "inductor")


def make_model_fn(model: torch.nn.Module, labels: torch.Tensor, diffusion, guidance: Guidance, precision: str,
                  device: torch.device) -> CountingModelFn:
    """The counted model_fn: CFG for class-conditional models, the null class for unconditional ones.

    A model whose weights are fp32 asked to run in bf16/fp16 (a caller that skipped `inference_model`) runs under
    autocast; `CastWeights` and fp32 runs need no context.
    """
    if model.config.num_classes == 0:
        inner = unconditional_model_fn(model, diffusion)
    else:
        inner = guided_model_fn(model, labels, diffusion, guidance, null_class=model.config.num_classes)
    dtype = resolve_precision(precision)
    cast = dtype != torch.float32 and not isinstance(_unwrapped(model), CastWeights)
    context = (lambda: autocast(device, dtype)) if cast else contextlib.nullcontext

    def model_fn(x: torch.Tensor, index: torch.Tensor, *step_index: torch.Tensor) -> torch.Tensor:
        with context():
            return inner(x, index, *step_index).float()

    return CountingModelFn(model_fn)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper or an AOTInductor package."""
    return model.model if isinstance(model, AotCompiled) else getattr(model, "_orig_mod", model)


def check_guidance(config: DiTConfig, guidance: Guidance) -> None:
    """Guidance needs the null class, which exists only when labels were dropped in training."""
    if config.num_classes > 0 and guidance.scale != 1.0 and config.class_dropout_prob == 0:
        raise UserError(f"--cfg {guidance.scale:g} needs a null class, but this model was trained without label "
                        "dropout", "use --cfg 1")


def batch_width(config: GenerateConfig) -> int:
    """Images per forward pass: the batch size (at most the run's size) rounded up to a multiple of ROW_QUANTUM.

    Matmul kernels (MKL/oneDNN on CPU, cuBLAS on GPU) may pick another code path, and round differently, for a row
    count that is not a multiple of 4. Every forward of a run has this one width, whatever the rank or the position
    of the batch, so image i comes out bit-identical for any batch size, order or number of processes.
    """
    return -(-min(config.batch_size, config.num_images) // ROW_QUANTUM) * ROW_QUANTUM


def sample_latents(model: torch.nn.Module, plan, config: GenerateConfig, indices: list[int], width: int,
                   device: torch.device, on_step: StepFn = None) -> tuple[torch.Tensor, int, float]:
    """Denoise images `indices`, padded to `width` by repeating the last one: (width, C, H, W) latents, the NFE and
    how many of those evaluations reused the cache (a fresh one per batch)."""
    padded = indices + indices[-1:] * (width - len(indices))
    model = model if config.cache is None else BlockCache(model, config.cache)
    labels = torch.tensor([config.labels[i] for i in padded], device=device)
    noise = ImageNoise(config.seed, padded)
    model_fn = make_model_fn(model, labels, plan.process, config.guidance, config.precision, device)
    shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    x = noise(torch.empty((width, *shape), device=device))  # (B, C, H, W)
    callback = None if on_step is None else (lambda step, num_steps, x: on_step(step, num_steps))
    with torch.no_grad():
        latents = plan.sample(model_fn, x, plan.process, noise, callback)
    return latents.float(), model_fn.calls, getattr(model, "reused", 0.0)


def generate_images(model: torch.nn.Module, codec, config: GenerateConfig, indices: Sequence[int],
                    device: torch.device, on_step: StepFn = None, plan: SamplerPlan | None = None) -> Iterator[Batch]:
    """Sample the images `indices` of the run `config`, `batch_width(config)` at a time.

    The last batch is padded to the same width (static shapes also suit torch.compile) and the padding dropped.
    A caller that built and checked the plan already (`ditcli.sampling_run`) passes it in.
    """
    if not indices:
        return
    if plan is None:
        check_guidance(model.config, config.guidance)
        plan = config.plan(model.config.learn_sigma)
    net = inference_model(model, config.precision)
    net = compiled_for(net, device) if config.compile else net
    decoder = codec.decoding_in(resolve_precision(config.precision))
    width = batch_width(config)
    for start in range(0, len(indices), width):
        chunk = [int(i) for i in indices[start:start + width]]
        latents, nfe, reused = sample_latents(net, plan, config, chunk, width, device, on_step)
        with torch.no_grad():
            images = to_uint8(decoder.decode(latents))[: len(chunk)]  # (n, H, W, C)
        yield Batch(chunk, [config.labels[i] for i in chunk], images.cpu(), nfe, reused)


# The run: split, skip, sample, write, finish.

@dataclass
class RunSummary:
    total: int
    generated: int
    skipped: int
    nfe: int | None
    seconds: float
    files: list[str] = field(default_factory=list)
    compile_seconds: float | None = None  # a compiled run's first batch less the median of the others
    reused_share: float | None = None  # with --cache, the share of the rows' evaluations that skipped the deep blocks

    @property
    def images_per_second(self) -> float | None:
        return self.generated / self.seconds if self.generated and self.seconds > 0 else None


def sample_run(model: torch.nn.Module, codec, config: GenerateConfig, device: torch.device, writers: list,
               ranks: Ranks = Ranks(), provenance: dict | None = None,
               on_batch: Callable[[Batch], None] | None = None, on_step: StepFn = None,
               on_plan: Callable[[int], None] | None = None, plan: SamplerPlan | None = None) -> RunSummary:
    """Generate what the writers do not hold yet, this rank's share of it, and let rank 0 finish the files.

    The writers must be prepared (rank 0) before this is called. Rank 0 decides what is left and finishes the files;
    the other ranks follow its decisions, so all ranks reach the same collectives and exit together.
    """
    # Rank 0 finds what earlier runs finished; every rank splits the rest the same way.
    def finished() -> set[int] | None:
        if ranks.rank != 0:
            return None
        return set.intersection(set(range(config.num_images)), *(writer.done(config.labels) for writer in writers))

    done = from_rank0(on_every_rank(finished))
    remaining = [i for i in range(config.num_images) if i not in done]
    mine = remaining[ranks.rank::ranks.world]
    if on_plan is not None:
        on_plan(len(mine))

    # Sample and write.
    start, counts, reused, times = time.perf_counter(), [], [], []
    for batch in generate_images(model, codec, config, mine, device, on_step, plan):
        for writer in writers:
            writer.write(batch)
        counts.append(batch.nfe)
        reused.append(batch.reused)
        times.append(time.perf_counter() - start - sum(times))
        if on_batch is not None:
            on_batch(batch)
    seconds = time.perf_counter() - start
    nfe = mean_nfe(counts)
    compile_seconds = round(times[0] - statistics.median(times[1:]), 3) if config.compile and len(times) > 1 else None
    summary = RunSummary(config.num_images, len(mine), len(done), nfe, seconds, compile_seconds=compile_seconds)
    if config.cache is not None and counts:
        summary.reused_share = round(sum(reused) / sum(counts), 4)

    # Rank 0 merges and records what was made; a rank that could not write its shards shows up as missing images.
    def finish() -> list[str]:
        if ranks.rank != 0:
            return []
        summary.nfe = nfe if nfe is not None else (provenance or {}).get("nfe")
        record = {**(provenance or {}), "nfe": summary.nfe, "world_size": ranks.world, "batch_size": config.batch_size,
                  "rank0_seconds": round(seconds, 3), "rank0_images": len(mine), "skipped_images": len(done)}
        return [str(p) for writer in writers for p in writer.finish(config.labels, record)]

    ranks.barrier()
    summary.files = on_every_rank(finish)
    return summary


def mean_nfe(counts: list[int]) -> int | float | None:
    """The model evaluations per image: the same for every batch of a fixed-step sampler, an adaptive solver's
    mean over the batches otherwise."""
    if not counts:
        return None
    if len(set(counts)) == 1:
        return counts[0]
    return round(sum(counts) / len(counts), 2)


def default_out_dir(model_name: str, config: GenerateConfig, run_key: str) -> Path:
    """samples/<model>-<sampler><steps>-cfg<scale>-<key>: a new folder per setting, the same one to resume."""
    name = re.sub(r"[^A-Za-z0-9.]+", "-", model_name).strip("-")
    return Path("samples") / f"{name}-{config.sampler}{config.steps}-cfg{config.guidance.scale:g}-{run_key[:6]}"
