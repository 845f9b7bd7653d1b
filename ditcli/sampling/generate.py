"""Sampling a DiT into images, edm2-style: `generate_images()` yields batches and the writers put them on disk.

Image i of a run depends only on the run's settings and i: its class, starting noise and step noise come from
generators seeded by (seed, i). So batches can be any size, ranks can split the indices any way, and a re-run can skip
the images an earlier run finished. Nothing here prints; progress goes through callbacks.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ditcli.diffusion.guidance import (
    CountingModelFn,
    Guidance,
    ImageNoise,
    guided_model_fn,
    image_seed,
    unconditional_model_fn,
)
from ditcli.diffusion.samplers import SamplerPlan
from ditcli.errors import UserError
from ditcli.model.codec import to_uint8
from ditcli.model.dit import DiTConfig
from ditcli.ranks import Ranks, from_rank0, on_every_rank
from ditcli.runtime import autocast, resolve_precision
from ditcli.sampling.block_cache import BlockCache
from ditcli.sampling.config import LABEL_STREAM, GenerateConfig
from ditcli.sampling.forward import (
    CastWeights,
    _unwrapped,
    batch_width,
    compiled_for,
    inference_model,
)

StepFn = Callable[[int, int], None] | None


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
    passes: float | None = None  # forward passes per image: a guided evaluation's doubled batch counts twice


class ForwardRows:
    """The model as a model_fn adapter calls it, counting the rows of every forward. Over the batch's width that is
    the forward passes per image: the NFE counts a guided evaluation's doubled batch [cond, uncond] once, this
    twice."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.config, self.rows = model, model.config, 0

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x, *args, **kwargs)


def make_model_fn(model: torch.nn.Module, labels: torch.Tensor, diffusion, guidance: Guidance, precision: str,
                  device: torch.device, rows: ForwardRows | None = None) -> CountingModelFn:
    """The counted model_fn: CFG for class-conditional models, the null class for unconditional ones.

    A model whose weights are fp32 asked to run in bf16/fp16 (a caller that skipped `inference_model`) runs under
    autocast; `CastWeights` and fp32 runs need no context. `rows`, a `ForwardRows` of `model`, counts its forwards.
    """
    called = model if rows is None else rows
    if model.config.num_classes == 0:
        inner = unconditional_model_fn(called, diffusion)
    else:
        inner = guided_model_fn(called, labels, diffusion, guidance, null_class=model.config.num_classes)
    dtype = resolve_precision(precision)
    cast = dtype != torch.float32 and not isinstance(_unwrapped(model), CastWeights)
    context = (lambda: autocast(device, dtype)) if cast else contextlib.nullcontext

    def model_fn(x: torch.Tensor, index: torch.Tensor, *step_index: torch.Tensor, **times: torch.Tensor) -> torch.Tensor:
        with context():
            return inner(x, index, *step_index, **times).float()  # times: a mean-flow model's r

    return CountingModelFn(model_fn)


def check_guidance(config: DiTConfig, guidance: Guidance) -> None:
    """Guidance needs the null class, which exists only when labels were dropped in training."""
    if config.num_classes > 0 and guidance.scale != 1.0 and config.class_dropout_prob == 0:
        raise UserError(f"--cfg {guidance.scale:g} needs a null class, but this model was trained without label "
                        "dropout", "use --cfg 1")


def sample_latents(model: torch.nn.Module, plan, config: GenerateConfig, indices: list[int], width: int,
                   device: torch.device, on_step: StepFn = None) -> tuple[torch.Tensor, int, float, float]:
    """Denoise images `indices`, padded to `width` by repeating the last one: (width, C, H, W) latents, the NFE, how
    many of those evaluations reused the cache (a fresh one per batch) and the forward passes per image."""
    padded = indices + indices[-1:] * (width - len(indices))
    model = model if config.cache is None else BlockCache(model, config.cache)
    labels = torch.tensor([config.labels[i] for i in padded], device=device)
    noise = ImageNoise(config.seed, padded)
    rows = ForwardRows(model)
    model_fn = make_model_fn(model, labels, plan.process, config.guidance, config.precision, device, rows)
    shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    x = noise(torch.empty((width, *shape), device=device))  # (B, C, H, W)
    callback = None if on_step is None else (lambda step, num_steps, x: on_step(step, num_steps))
    with torch.no_grad():
        latents = plan.sample(model_fn, x, plan.process, noise, callback)
    return latents.float(), model_fn.calls, getattr(model, "reused", 0.0), rows.rows / width


def generate_images(model: torch.nn.Module, codec, config: GenerateConfig, indices: Sequence[int],
                    device: torch.device, on_step: StepFn = None, plan: SamplerPlan | None = None) -> Iterator[Batch]:
    """Sample the images `indices` of the run `config`, `batch_width(config)` at a time.

    The last batch is padded to the same width (static shapes also suit torch.compile) and the padding dropped.
    A caller that built and checked the plan already (`ditcli.sampling.request`) passes it in.
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
        latents, nfe, reused, passes = sample_latents(net, plan, config, chunk, width, device, on_step)
        with torch.no_grad():
            images = to_uint8(decoder.decode(latents))[: len(chunk)]  # (n, H, W, C)
        yield Batch(chunk, [config.labels[i] for i in chunk], images.cpu(), nfe, reused, passes)


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
    passes: int | float | None = None  # forward passes per image (a doubled CFG batch counts twice; the NFE once)

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
    start, counts, reused, times, passes = time.perf_counter(), [], [], [], []
    for batch in generate_images(model, codec, config, mine, device, on_step, plan):
        for writer in writers:
            writer.write(batch)
        counts.append(batch.nfe)
        reused.append(batch.reused)
        passes.append(batch.passes)
        times.append(time.perf_counter() - start - sum(times))
        if on_batch is not None:
            on_batch(batch)
    seconds = time.perf_counter() - start
    nfe = mean_nfe(counts)
    compile_seconds = round(times[0] - statistics.median(times[1:]), 3) if config.compile and len(times) > 1 else None
    summary = RunSummary(config.num_images, len(mine), len(done), nfe, seconds, compile_seconds=compile_seconds,
                         passes=mean_nfe(passes))
    if config.cache is not None and counts:
        summary.reused_share = round(sum(reused) / sum(counts), 4)

    # Rank 0 merges and records what was made; a rank that could not write its shards shows up as missing images.
    def finish() -> list[str]:
        if ranks.rank != 0:
            return []
        summary.nfe = nfe if nfe is not None else (provenance or {}).get("nfe")
        summary.passes = summary.passes if summary.passes is not None else (provenance or {}).get("passes")
        record = {**(provenance or {}), "nfe": summary.nfe, "passes": summary.passes, "world_size": ranks.world,
                  "batch_size": config.batch_size,
                  "rank0_seconds": round(seconds, 3), "rank0_images": len(mine), "skipped_images": len(done)}
        return [str(p) for writer in writers for p in writer.finish(config.labels, record)]

    ranks.barrier()
    summary.files = on_every_rank(finish)
    return summary


def mean_nfe(counts: list[int | float]) -> int | float | None:
    """The model evaluations (or forward passes) per image: the same for every batch of a fixed-step sampler, an
    adaptive solver's mean over the batches otherwise."""
    if not counts:
        return None
    if len(set(counts)) == 1:
        return int(counts[0]) if float(counts[0]).is_integer() else counts[0]
    return round(sum(counts) / len(counts), 2)


def default_out_dir(model_name: str, config: GenerateConfig, run_key: str) -> Path:
    """samples/<model>-<sampler><steps>-cfg<scale>-<key>: a new folder per setting, the same one to resume."""
    name = re.sub(r"[^A-Za-z0-9.]+", "-", model_name).strip("-")
    return Path("samples") / f"{name}-{config.sampler}{config.steps}-cfg{config.guidance.scale:g}-{run_key[:6]}"
