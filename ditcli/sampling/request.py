"""The core of `dit sample`: check the request, find and read the checkpoint, plan the run, prepare the writers.

`prepare_run` does everything before sampling (cheap checks before the codec loads); `ditcli.sampling.generate.sample_run`
then samples. Nothing here prints: the command renders notes, warnings and the result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ditcli.data.classes import ClassTable, class_table, slug
from ditcli.data.images import GRID_MAX, pil_image
from ditcli.diffusion.guidance import DEFAULT_CHANNELS, GUIDED_CHANNELS, MAX_CFG, MAX_SEED, Guidance
from ditcli.diffusion.objectives import Objective
from ditcli.diffusion.samplers import FLOW_MAP, MAX_STEPS, SamplerPlan, SamplingDefaults, check_sampler_settings
from ditcli.downloads import home_dir, remembered_sha256
from ditcli.errors import UserError
from ditcli.evaluation.protocol import SAMPLE_PRESETS, expand_preset
from ditcli.hub import is_offline
from ditcli.io import check_creatable
from ditcli.model.codec import (
    LATENT_CHANNELS,
    VAE_ALIASES,
    PixelCodec,
    VaeCodec,
    codec_from_dict,
    decode_dtype,
    default_codec_spec,
)
from ditcli.ranks import Ranks, from_rank0, on_every_rank
from ditcli.runtime import resolve_precision
from ditcli.sampling.aot import package_exists, package_path
from ditcli.sampling.block_cache import check_threshold
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.forward import compile_pays, inference_model
from ditcli.sampling.generate import (
    check_guidance,
    class_labels,
    default_out_dir,
    generate_images,
    random_labels,
)
from ditcli.sampling.writers import ImageDirWriter, NpzWriter
from ditcli.version import __version__
from ditcli.weights.locate import (
    DownloadProgress,
    check_model_choice,
    find_checkpoint,
    read_checkpoint,
)
from ditcli.weights.record import Checkpoint, describe
from ditcli.weights.registry import KnownWeights

DEFAULT_NUM = 16
PIXELS = "none"  # `--vae none`: the model works in pixels, as `dit train --vae none` trains it
DEFAULT_PRECISION = "fp32"
MAX_IMAGES = 10_000_000  # 200 ImageNet FID-50k runs; a bound so a typo fails at once, not after building labels


@dataclass(frozen=True)
class SampleRequest:
    """What `dit sample` was asked for, after --preset is expanded; None means "the model's default"."""

    model: str | None = None
    image_size: int | None = None
    ckpt: Path | None = None
    classes: tuple[str, ...] = ()
    num_per_class: int | None = None
    num: int | None = None
    steps: int | None = None
    cfg: float | None = None
    guidance_channels: str | None = None  # None: the model's, else DEFAULT_CHANNELS
    guidance_interval: str | None = None
    sampler: str | None = None
    eta: float | None = None
    seed: int = 0
    batch_size: int = 32
    out: Path | None = None
    npz: Path | None = None
    vae: str | None = None
    vae_from_preset: bool = False
    precision: str = DEFAULT_PRECISION
    compile: bool | None = None  # None: compile only where the job repays it (`generate.compile_pays`)
    deterministic: bool = False
    offline: bool = False
    force: bool = False
    preset: str | None = None
    weights: str | None = None
    objective: Objective | None = None  # --objective/--time-direction, for a file that does not record them
    time_shift: float | None = None
    atol: float | None = None
    rtol: float | None = None
    cache: float | None = None  # `BlockCache`'s threshold; None: every block at every step
    notes: tuple[str, ...] = ()  # what --preset's expansion said, shown with the preset
    decoupled_depth: int | None = None  # --decoupled-depth, for a DMF file that does not record it
    num_heads: int | None = None  # --num-heads, for a bare state dict of a width outside the presets

    def check(self) -> None:
        """The numbers and the choice of model, before any file is read or written."""
        check_counts(self.num, self.num_per_class, self.batch_size, self.steps, len(self.classes))
        check_numbers(self.cfg, self.eta, self.seed, self.guidance_interval, self.guidance_channels)
        check_model_choice(self.model, self.image_size, self.ckpt)
        resolve_precision(self.precision)
        check_cache(self.cache, self.compile)

    def sampler_settings(self) -> dict[str, str]:
        """The sampler's settings given (setting -> option), each refused where the sampler does not read it."""
        given = (("steps", "--steps", self.steps), ("eta", "--eta", self.eta), ("time-shift", "--time-shift",
                 self.time_shift), ("atol", "--atol", self.atol), ("rtol", "--rtol", self.rtol))
        return {setting: flag for setting, flag, value in given if value is not None}

    def read(self, ranks: Ranks, download: DownloadProgress = None
             ) -> tuple[Path, KnownWeights | None, Checkpoint]:
        """Find the checkpoint (rank 0 downloads first) and read it with the weights, the objective (a known model's
        own where none is given), the decoupled depth and the heads asked for: its path, registry entry and record."""
        with ranks.zero_first():
            path, entry = find_checkpoint(self.model, self.image_size, self.ckpt, self.offline, download)
        objective = self.objective or (entry and entry.objective)
        return path, entry, read_checkpoint(path, self.model, self.weights, objective, self.decoupled_depth,
                                            self.num_heads)

    def source_note(self, path: Path) -> list[str]:
        """What --ckpt became, where it was a `dit train` run folder: its newest checkpoint, named."""
        if self.ckpt is None or not Path(self.ckpt).is_dir() or not path.is_file():
            return []
        return [f"--ckpt {self.ckpt} is a dit train run folder: sampling its newest checkpoint, {path.name}"]


@dataclass
class SamplingRun:
    """Everything `sample_run` needs, and what the command reports."""

    net: torch.nn.Module
    codec: object
    config: GenerateConfig
    plan: SamplerPlan
    writers: list
    provenance: dict
    out: Path | None
    npz: Path | None
    run_key: str
    weights: str
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the run chose for the user, each shown as one note line


@dataclass
class LoadedRun:
    """A request once its checkpoint is read and checked: the model, its codec and the run's settings, before any
    output is named."""

    path: Path
    entry: KnownWeights | None
    checkpoint: Checkpoint
    net: torch.nn.Module
    codec: object
    config: GenerateConfig
    plan: SamplerPlan
    names: ClassTable
    columns: int | None
    notes: list[str]
    warnings: list[str]
    compile_choice: str


def load_run(request: SampleRequest, device: torch.device, ranks: Ranks = Ranks(), download: DownloadProgress = None,
             on_warning: Callable[[str], None] | None = None) -> LoadedRun:
    """Find and read the checkpoint (rank 0 downloads first), check everything cheap, load the codec and build the
    model: everything `dit sample` and `ditcli.generate` share. `on_warning` hears a stale EMA before the codec
    loads."""
    r = request
    checkpoint_path, entry, checkpoint = r.read(ranks, download)
    notes = r.source_note(checkpoint_path) + list(r.notes)

    # Check everything cheap (sampler, guidance, classes, sizes) before the codec loads.
    config, names, columns, vae = run_config(r, checkpoint, entry, notes)
    given_size = r.image_size if r.ckpt is not None else None
    check_image_size(checkpoint, given_size, vae)
    plan = config.plan(checkpoint.config.learn_sigma)
    warnings = stale_weights(checkpoint) + [line for line in [checkpoint.objective.guidance_warning(
        config.guidance.scale)] if line]
    for warning in warnings:
        if on_warning is not None:
            on_warning(warning)

    # Load the codec (rank 0 first: it may download) and check it fits the model.
    with ranks.zero_first():
        codec = codec_from_dict(checkpoint.codec, device, checkpoint.config.in_channels, vae, is_offline(r.offline))
    check_codec(checkpoint, codec, given_size)

    # Build the model (cast once, here, so a package can be looked up) and take one compile choice for all ranks.
    net = inference_model(checkpoint.build(device), r.precision)
    config, compile_choice = from_rank0(choose_compile(r.compile, config, net, plan, device))
    if config.compile:
        on_every_rank(lambda: check_compile_home(net, device), "cannot keep the compiled forward")
    return LoadedRun(checkpoint_path, entry, checkpoint, net, codec, config, plan, names, columns, notes, warnings,
                     compile_choice)


def run_config(r: SampleRequest, checkpoint: Checkpoint, entry: KnownWeights | None, notes: list[str]
               ) -> tuple[GenerateConfig, ClassTable, int | None, str | None]:
    """The run's settings from the request over the checkpoint's own defaults (then its registry entry's, then its
    objective's), checked against the model: the config, the class table, the grid's columns and the --vae to load."""
    model_config = checkpoint.config
    defaults = checkpoint.sampling or (entry.sampling if entry else checkpoint.objective.default_sampling)
    channels = r.guidance_channels or defaults.channels or DEFAULT_CHANNELS
    guidance = make_guidance(r.cfg if r.cfg is not None else defaults.cfg, channels, r.guidance_interval,
                             model_config, defaults.interval)
    checkpoint.objective.check_interval(guidance.interval, f": this is {checkpoint.objective.noun()}")
    if guidance.scale == 1 and parse_interval(r.guidance_interval) is not None:
        raise UserError("--guidance-interval only applies to a guided run, and this one samples without guidance "
                        "(cfg 1)", "drop --guidance-interval, or pass a --cfg other than 1")
    check_second_time(model_config, r.cache)
    sampler, steps = sampler_and_steps(r.sampler, r.steps, defaults)
    check_preset_fits(r.preset, sampler, checkpoint)
    flow = checkpoint.objective.sampler_settings(r.time_shift, r.atol, r.rtol)
    check_sampler_settings(sampler, r.sampler_settings())
    vae = vae_choice(checkpoint, r.vae, r.vae_from_preset, notes)
    names = class_table(model_config.num_classes, checkpoint.class_names)
    labels, columns = plan_run(names, model_config.num_classes, list(r.classes), r.num_per_class, r.num, r.seed)
    config = GenerateConfig(tuple(labels), r.seed, sampler, steps, r.eta or 0.0, guidance, r.batch_size, r.precision,
                            False, checkpoint.schedule, checkpoint.objective, flow, r.cache)
    return config, names, columns, vae


def sample_images(request: SampleRequest, device: torch.device,
                  on_warning: Callable[[str], None] | None = None) -> list[Image.Image]:
    """`dit sample` without files: the same checks and defaults, the same sampling core, the same pixels (image i of
    a seed is image i of the command's run), returned as PIL images in index order. Nothing is written; `request`
    must name no outputs."""
    if request.out is not None or request.npz is not None or request.preset is not None:
        raise UserError("images are returned, not written, so outputs and presets do not apply",
                        "drop out, npz and preset; write the images with their save()")
    request.check()
    run = load_run(request, device, on_warning=on_warning)
    return [pil_image(image.numpy()) for batch in generate_images(run.net, run.codec, run.config,
                                                                  range(run.config.num_images), device, plan=run.plan)
            for image in batch.images]


def prepare_run(request: SampleRequest, device: torch.device, ranks: Ranks, download: DownloadProgress = None,
                on_warning: Callable[[str], None] | None = None,
                on_ready: Callable[..., None] | None = None
                ) -> SamplingRun:
    """`load_run`, then name the outputs, record how they are made and prepare the writers. `on_ready(config,
    codec, out, npz, notes)` hears the settings just before the writers touch the disk."""
    r = request
    run = load_run(r, device, ranks, download, on_warning)
    checkpoint, config, codec = run.checkpoint, run.config, run.codec
    hashed = remembered_sha256(run.path)
    run_key = config.run_key(hashed.sha256, codec.to_dict())
    out, npz = output_paths(r, default_out_dir(run.entry.model if run.entry else run.path.stem, config, run_key))
    provenance = make_provenance(run.entry.model if run.entry else describe(checkpoint.config), run.path,
                                 hashed.sha256, checkpoint, config, run.plan.nfe, codec,
                                 resolve_precision(r.precision), device, r.deterministic, run_key, r.cfg is not None)
    provenance["preset"] = r.preset
    provenance["compile"] = {"compiled": config.compile, "why": run.compile_choice}
    if on_ready is not None:
        on_ready(config, codec, out, npz, run.notes)
    writers = make_writers(out, npz, run.names, config, run_key, r.force, provenance, run.columns, ranks)
    hashed.remember()
    return SamplingRun(run.net, codec, config, run.plan, writers, provenance, out, npz, run_key, checkpoint.weights,
                       run.warnings, run.notes)


# Sampler steps a sampler takes when it is named without --steps and the file records another sampler: the
# reference's DDPM-250, DDIM's 50 (DiTPipeline's default), DPM-Solver++(2M)'s 25 (what `dit train` records) and
# UniPC's 20 (both at DDPM-250's quality on the embedded model, docs/fashion-mnist.md), Euler at 50, Heun at 25 (50
# evaluations); a flow model's SDE at REPA's 50 (SiT's published FID uses 250), dopri5 at SiT's 50 (its grid; the
# solver adapts); a mean flow's map in one step.
SAMPLER_STEPS = {"ddpm": 250, "ddim": 50, "dpm++2m": 25, "unipc": 20, "euler": 50, "heun": 25, "dopri5": 50,
                 "sde": 50, FLOW_MAP: 1}


def sampler_and_steps(sampler: str | None, steps: int | None, defaults: SamplingDefaults) -> tuple[str, int]:
    """The sampler and its steps: as given, else the file's. A sampler named without --steps takes the file's steps
    only where the file records that sampler, else its own (`SAMPLER_STEPS`): steps tuned for Euler are too few for
    the SDE."""
    sampler = sampler or defaults.sampler
    if steps is not None:
        return sampler, steps
    if sampler == defaults.sampler:
        return sampler, defaults.steps
    return sampler, SAMPLER_STEPS.get(sampler, defaults.steps)


def check_preset_fits(preset: str | None, sampler: str, checkpoint: Checkpoint) -> None:
    """A preset is a published protocol for one kind of model: one that picked a sampler this model's objective
    cannot run is refused naming the preset, not the sampler it chose."""
    if preset is None or sampler in checkpoint.objective.samplers or sampler != SAMPLE_PRESETS[preset].sampler:
        return
    raise UserError(f"--preset {preset} is DiT's FID protocol for DDPM models ({SAMPLE_PRESETS[preset].describe()}), "
                    f"and this is {checkpoint.objective.noun()}",
                    "drop --preset: sample with the model's own settings and --num-images, and score with `dit fid`")


def check_second_time(model_config, cache: float | None) -> None:
    """A mean-flow model's forward takes a second time r, which the block cache does not pass (a compiled package
    takes it as a fourth input)."""
    if model_config.mean_flow_form is not None and cache is not None:
        raise UserError("--cache does not run a mean-flow model (its forward takes a second time r, and one or two "
                        "steps leave nothing to reuse)", "drop --cache")


def choose_compile(given: bool | None, config: GenerateConfig, net: torch.nn.Module, plan: SamplerPlan,
                   device: torch.device) -> tuple[GenerateConfig, str]:
    """--compile/--no-compile as given, else what `compile_pays` says for this job, counting on a CPU the package an
    earlier run built; and why, for the provenance."""
    if given is not None:
        return replace(config, compile=given), f"{'--compile' if given else '--no-compile'} given"
    if config.cache is not None:
        return config, "eager: --cache runs the blocks one at a time"
    choice, why = compile_pays(config, net.config, plan.nfe, device)
    if not choice and device.type == "cpu" and compile_pays(config, net.config, plan.nfe, device, built=True)[0] \
            and package_exists(home_dir() / "aoti", net):  # hashing the weights only where a package would pay
        choice, why = compile_pays(config, net.config, plan.nfe, device, built=True)
    return replace(config, compile=choice), why


def check_compile_home(net: torch.nn.Module, device: torch.device) -> None:
    """A compiled run keeps inductor's caches in the home folder (DIT_HOME) and, on a CPU, its AOTInductor package
    there: a home that cannot hold them is refused before any output is written or the compile (tens of seconds)
    runs."""
    paths = [(home_dir() / "inductor", "folder")]
    if device.type == "cpu":
        paths.append((package_path(home_dir() / "aoti", net), "file"))
    try:
        for path, kind in paths:
            check_creatable(path, "DIT_HOME: the compile cache", kind)
    except UserError as exc:
        raise UserError(exc.what, "set DIT_HOME to a writable folder, or pass --no-compile") from None


def output_paths(request: SampleRequest, default: Path) -> tuple[Path | None, Path | None]:
    """--out and --npz; a preset writes an .npz by default, a plain run a folder."""
    out, npz = request.out, request.npz
    if request.preset is not None and npz is None:
        npz = default.with_name(f"{default.name}-{request.preset}.npz")
    if out is None and npz is None:
        out = default
    return out, npz


def stale_weights(checkpoint: Checkpoint) -> list[str]:
    """An EMA that has not yet moved from its start samples noise: one warning saying so, or none."""
    stale = checkpoint.ema.staleness() if checkpoint.ema is not None and checkpoint.weights == "ema" else None
    return [stale] if stale else []


def expand_sample_preset(preset: str | None, **options) -> tuple[dict, list[str]]:
    """The options with --preset filled in under them; options left at their defaults count as not given."""
    if preset is None:
        return options, []
    given = {**options, "precision": None if options["precision"] == DEFAULT_PRECISION else options["precision"]}
    return expand_preset(preset, given)


def vae_choice(checkpoint: Checkpoint, vae: str | None, from_preset: bool, notes: list[str]) -> str | None:
    """The --vae to load, None for the checkpoint's own codec. `--vae none` says the model works in pixels (as `dit
    train` names it): a file from elsewhere that records no codec gets the pixel codec, one that records a VAE is
    refused. A preset's VAE is dropped, with a note, for a pixel-space model, which has none."""
    spec, channels = checkpoint.codec or {}, checkpoint.config.in_channels
    if vae == PIXELS:
        if spec.get("kind") == "vae" and checkpoint.config_recorded:
            raise UserError(f"--vae none: the checkpoint records the VAE {spec.get('vae')}, so it is a latent model",
                            "drop --vae none, or pass --vae with another VAE")
        checkpoint.codec = {"kind": "pixel", "channels": channels}
        return None
    if from_preset and spec.get("kind") == "pixel":
        notes.append(f"the model is pixel-space, so the preset's {vae} VAE does not apply")
        return None
    if vae is not None and spec.get("kind") == "pixel":  # as the codec would refuse it, before the sampler's plan
        raise UserError("--vae does not apply: this checkpoint is a pixel-space model", "drop --vae")
    if vae is None and checkpoint.codec is None and channels != LATENT_CHANNELS:
        raise UserError(f"the checkpoint records no codec, and its {channels} input channels fit no SD VAE (they "
                        f"have {LATENT_CHANNELS})", "pass --vae none for a model that works in pixels, or --vae with "
                                                    "its VAE")
    return vae


def check_cache(threshold: float | None, compile_model: bool | None) -> None:
    try:
        check_threshold(threshold)
    except ValueError:
        raise UserError(f"--cache must be a finite threshold >= 0, got {threshold:g}",
                        "0 runs every block; 0.05-0.1 kept FD near the uncached one on the embedded model, "
                        "see docs/sampling.md") from None
    if threshold is not None and compile_model:
        raise UserError("--cache runs the blocks one at a time, eagerly, so it cannot be compiled",
                        "drop --compile, or drop --cache")


def check_counts(num: int | None, num_per_class: int | None, batch_size: int, steps: int | None,
                 num_classes_asked: int = 0) -> None:
    for flag, value, high in (("--num", num, MAX_IMAGES), ("--num-per-class", num_per_class, MAX_IMAGES),
                              ("--batch-size", batch_size, MAX_IMAGES), ("--steps", steps, MAX_STEPS)):
        if value is not None and not 1 <= value <= high:
            raise UserError(f"{flag} must be between 1 and {high:,}, got {value:,}",
                            f"pass {flag} {min(max(value, 1), high)}")
    if num is not None and num_per_class is not None:
        raise UserError("--num and --num-per-class exclude each other",
                        "--num draws random classes; --num-per-class gives K of each --class, or of every class "
                        "without one")
    if num_per_class is not None:  # without --class: every class of the model, checked once it is known
        check_per_class_total(num_per_class, num_classes_asked)


def check_per_class_total(num_per_class: int, num_classes: int) -> None:
    if num_per_class * num_classes > MAX_IMAGES:
        raise UserError(f"--num-per-class {num_per_class:,} for {num_classes:,} classes is more than "
                        f"{MAX_IMAGES:,} images", "ask for fewer images per class, or name the classes with --class")


def check_numbers(cfg: float | None, eta: float | None, seed: int, interval: str | None,
                  guidance_channels: str | None = None) -> None:
    """The float options and the seed, each named, before anything is loaded."""
    if cfg is not None and not (math.isfinite(cfg) and 0 <= cfg <= MAX_CFG):
        raise UserError(f"--cfg {cfg:g} is out of range",
                        f"pass a scale in [0, {MAX_CFG:g}]: 1 disables guidance, 0 is unconditional, DiT uses 1.5-4")
    if eta is not None and not (math.isfinite(eta) and 0 <= eta <= 1):
        raise UserError(f"--eta {eta:g} is out of range", "pass a number in [0, 1]: 0 is deterministic DDIM")
    if guidance_channels is not None and guidance_channels not in GUIDED_CHANNELS:
        raise UserError(f"unknown --guidance-channels {guidance_channels!r}", f"choose {' or '.join(GUIDED_CHANNELS)}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {seed}", "pass e.g. --seed 0")
    parse_interval(interval)


def check_image_size(checkpoint: Checkpoint, image_size: int | None, vae: str | None) -> None:
    """--image-size against what the model makes, before the codec loads: pixels, or the SD VAEs' 8x; any other VAE
    is checked against its own config once loaded (`check_codec`)."""
    spec = checkpoint.codec or default_codec_spec(LATENT_CHANNELS)
    if spec["kind"] == "pixel":
        factor = PixelCodec.downsample
    elif VAE_ALIASES.get(vae or spec.get("vae"), vae or spec.get("vae")) in VAE_ALIASES.values():
        factor = VaeCodec.downsample
    else:
        return
    pixels = checkpoint.config.input_size * factor
    if image_size is not None and image_size != pixels:
        raise UserError(f"--image-size {image_size} does not match the checkpoint, which makes {pixels}x{pixels} "
                        "images", f"drop --image-size or pass {pixels}")


def check_codec(checkpoint: Checkpoint, codec, image_size: int | None) -> None:
    config = checkpoint.config
    if codec.latent_channels != config.in_channels:
        raise UserError(f"the checkpoint's model takes {config.in_channels} input channels but its codec "
                        f"({codec.to_dict()}) gives {codec.latent_channels}",
                        "pass --vae with a matching VAE, or fix the codec recorded in the checkpoint")
    pixels = config.input_size * codec.downsample
    if image_size is not None and image_size != pixels:
        raise UserError(f"--image-size {image_size} does not match the checkpoint, which makes {pixels}x{pixels} "
                        "images", f"drop --image-size or pass {pixels}")


def make_guidance(scale: float, channels: str, interval: str | None, model_config,
                  default_interval: tuple[float, float] | None = None) -> Guidance:
    """The guidance settings, checked against what the model can do (a null class for any scale but 1); without
    --guidance-interval the model's own interval applies."""
    if scale < 0:
        raise UserError(f"--cfg must be >= 0, got {scale:g}", "1 disables guidance, 0 is unconditional")
    if model_config.num_classes == 0:
        return Guidance(1.0, channels)  # a model trained without labels has nothing to guide
    guidance = Guidance(scale, channels, default_interval if interval is None else parse_interval(interval))
    check_guidance(model_config, guidance)
    return guidance


def parse_interval(text: str | None) -> tuple[float, float] | None:
    if text is None or text.strip().lower() == "none":
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--guidance-interval {text!r} is not LOW,HIGH", "for example --guidance-interval 0,700") \
            from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
        raise UserError(f"--guidance-interval {text!r} is not an interval",
                        "pass LOW,HIGH with 0 <= LOW <= HIGH: training timesteps such as 0,700, or a flow model's "
                        "time such as 0,0.7")
    return low, high


def plan_run(names: ClassTable, num_classes: int, classes: list[str] | None, num_per_class: int | None,
             num: int | None, seed: int) -> tuple[list[int], int | None]:
    """Each image's class, and the grid width: one row per class for several --class (or --num-per-class alone: every
    class), else a square grid."""
    if num_classes == 0:
        if classes or num_per_class is not None:
            raise UserError("this model is unconditional (trained without labels)",
                            "drop --class and --num-per-class; --num sets the number of images")
        return [0] * (num or DEFAULT_NUM), None
    ids = [names.resolve(text) for text in classes or []]
    if num_per_class is not None and not ids:  # K images of every class, as FID protocols draw them
        check_per_class_total(num_per_class, num_classes)
        ids = list(range(num_classes))
    if ids and num is None:
        per_class = num_per_class or 4
        return class_labels(ids, per_class), per_class if len(ids) > 1 else None
    return random_labels(num or DEFAULT_NUM, seed, ids or list(range(num_classes))), None


def make_writers(out: Path | None, npz: Path | None, names: ClassTable, config: GenerateConfig, run_key: str,
                 force: bool, provenance: dict, columns: int | None, ranks) -> list:
    unconditional = len(names) == 0
    writers = []
    if out is not None:
        writers.append(ImageDirWriter(
            out, config.seed,
            caption=lambda label: "unconditional" if unconditional else f"{label} {names.name(label)}",
            file_label=lambda label: "uncond" if unconditional else f"{label}-{slug(names.name(label))}",
            grid_columns=columns or math.ceil(math.sqrt(min(config.num_images, GRID_MAX)))))
    if npz is not None:
        writers.append(NpzWriter(npz, ranks.rank))
    def prepare():  # rank 0 checks and clears the outputs; an error there stops every rank
        for writer in writers:
            if isinstance(writer, ImageDirWriter):
                writer.text = png_text(provenance)
        if ranks.rank != 0:
            return
        for writer in writers:  # every refusal before any writer touches the disk
            writer.check(run_key, force)
        for writer in writers:
            if isinstance(writer, ImageDirWriter):
                writer.prepare(run_key, force, writer.text)
            else:
                writer.prepare(run_key, force)

    on_every_rank(prepare)
    return writers


def png_text(provenance: dict) -> dict[str, str]:
    keys = ("model", "checkpoint_sha256", "weights", "schedule", "sampler", "steps", "cfg", "guidance_channels",
            "guidance_interval", "codec", "precision", "run_key")
    return {key: json.dumps(provenance[key]) if not isinstance(provenance[key], str) else provenance[key]
            for key in keys}


def codec_dtype(codec, dtype: torch.dtype) -> str | None:
    """The dtype the VAE decodes in for a run in `dtype`; None for pixel models."""
    if codec.to_dict()["kind"] != "vae":
        return None
    return str(decode_dtype(dtype)).removeprefix("torch.")


def make_provenance(model_name: str, path: Path, sha256: str, checkpoint: Checkpoint, config: GenerateConfig,
                    nfe: int | None, codec, dtype: torch.dtype, device: torch.device, deterministic: bool, run_key: str,
                    cfg_given: bool) -> dict:
    unconditional = checkpoint.config.num_classes == 0
    return {
        "model": model_name, "model_config": checkpoint.config.to_dict(), "checkpoint": str(path),
        "checkpoint_sha256": sha256, "sampler": config.sampler, "steps": config.steps, "nfe": nfe, "eta": config.eta,
        "cfg": None if unconditional else config.guidance.scale,
        "cfg_ignored": unconditional and cfg_given,
        "guidance_channels": config.guidance.channels,
        "guidance_interval": list(config.guidance.interval) if config.guidance.interval else None,
        "nfe_convention": "model evaluations per image; one evaluation of a doubled CFG batch counts as one",
        "weights": checkpoint.weights, "schedule": checkpoint.schedule,
        **checkpoint.objective.provenance(config.flow),
        "codec": codec.to_dict(), "precision": str(dtype).removeprefix("torch."), "device": str(device),
        "vae_dtype": codec_dtype(codec, dtype), "cache": config.cache,
        "deterministic": deterministic, "tf32": torch.backends.cuda.matmul.allow_tf32,
        "seed": config.seed, "num_images": config.num_images,
        "image_seeds": "image i: noise from torch.Generator().manual_seed(ditcli.diffusion.guidance.image_seed(seed, i)), "
                       "random class from ditcli.sampling.generate.random_labels",
        "labels": list(config.labels), "run_key": run_key, "ditcli": __version__, "torch": torch.__version__,
    }
