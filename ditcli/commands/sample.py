"""`dit sample` and `dit classes`: parse options, build a GenerateConfig, drive `sample_run` under a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from ditcli import __version__
from ditcli.checkpoint import load_checkpoint
from ditcli.classes import ClassTable, class_table, slug
from ditcli.codec import LATENT_CHANNELS, VAE_ALIASES, PixelCodec, VaeCodec, codec_from_dict, default_codec_spec
from ditcli.commands.options import (CheckpointOpt, CompileOpt, DeviceOpt, DistTimeoutOpt, JsonOpt, PrecisionOpt,
                                     SeedOpt)
from ditcli.errors import UserError
from ditcli.generate import (GenerateConfig, ImageDirWriter, NpzWriter, check_guidance, check_outputs, class_labels,
                             default_out_dir, distributed, random_labels, rank_device, sample_run)
from ditcli.hub import is_offline, resolve_source
from ditcli.images import GRID_MAX
from ditcli.model import PRESET_SHAPES, preset_names
from ditcli.progress import ProgressBar, byte_progress
from ditcli.protocol import PAPER_FID, SAMPLE_PRESETS, expand_preset
from ditcli.ranks import DEFAULT_TIMEOUT_S, collectives, on_every_rank
from ditcli.runtime import resolve_device, resolve_precision, set_backend_flags
from ditcli.samplers import DIT_SAMPLING, GUIDED_CHANNELS, SAMPLERS, Guidance, plan_sampler
from ditcli.state import Checkpoint, describe
from ditcli.weights import KnownWeights, file_sha256, known_weights, registry_models, resolve_weights

DEFAULT_MODEL = "DiT-XL/2"
DEFAULT_NUM = 16
DEFAULT_CHANNELS = "paper"
DEFAULT_PRECISION = "fp32"

ModelOpt = Annotated[str | None, typer.Option(
    "--model", help=f"A known checkpoint ({', '.join(registry_models())}) or, with --ckpt, a preset "
                    f"(DiT-S/2 ... DiT-XL/8). Default: {DEFAULT_MODEL}.")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="256 or 512: which released DiT-XL/2.")]
ClassOpt = Annotated[list[str] | None, typer.Option(
    "--class", help="Class id, name or WordNet id, case-insensitive; repeat for several. See `dit classes`.")]
NumPerClassOpt = Annotated[int | None, typer.Option("--num-per-class", help="Images per --class (default 4).")]
NumOpt = Annotated[int | None, typer.Option(
    "--num", "--num-images",
    help=f"Number of images, with uniform random classes (from --class if given). Default {DEFAULT_NUM}. Under "
         "torchrun write --num-images: torchrun takes --num for its own --numa-binding.")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Denoising steps (default: the model's; DiT-XL/2: 250).")]
CfgOpt = Annotated[float | None, typer.Option(
    "--cfg", help="Classifier-free guidance scale: 1 off, 0 unconditional (DiT-XL/2 default 4; 1.5 for FID).")]
GuidedOpt = Annotated[str, typer.Option(
    "--guidance-channels", help=f"{' or '.join(GUIDED_CHANNELS)}: the first 3 latent channels, as published, or all.")]
IntervalOpt = Annotated[str | None, typer.Option(
    "--guidance-interval", help="LOW,HIGH: guide only for training timesteps in [LOW, HIGH], e.g. 0,700.")]
SamplerOpt = Annotated[str | None, typer.Option("--sampler", help=f"{', '.join(SAMPLERS)} (default: the model's).")]
EtaOpt = Annotated[float | None, typer.Option(
    "--eta", help="DDIM noise in [0, 1]: 0 deterministic, 1 DDPM-like. Only with --sampler ddim. Default: 0.",
    show_default=False)]
BatchOpt = Annotated[int, typer.Option(
    "--batch-size", help="Images per forward pass and process, rounded up to a multiple of 4 (see docs/samplers.md).")]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", help="Folder for PNGs, grid.png and provenance.json (default: samples/<model>-<settings>).")]
NpzOpt = Annotated[Path | None, typer.Option(
    "--npz", help="Write all images as an ADM evaluator .npz (arr_0) plus a .provenance.json; PNGs and grid.png are "
                  "written only if --out is given too.")]
VaeOpt = Annotated[str | None, typer.Option("--vae", help="ema, mse, a Hugging Face id or a local folder.")]
DeterministicOpt = Annotated[bool, typer.Option(
    "--deterministic", help="No TF32, deterministic algorithms, no cuDNN autotuning.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never download (also DIT_OFFLINE=1 or HF_HUB_OFFLINE=1).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace outputs of a different run instead of refusing.")]
SampleWeightsOpt = Annotated[str | None, typer.Option(
    "--weights", help="ema or model: which weights of a training checkpoint to sample (default ema).")]
SearchOpt = Annotated[str | None, typer.Option("--search", help="Show only classes whose id or names contain TEXT.")]
PresetOpt = Annotated[str | None, typer.Option(
    "--preset", help=f"A named protocol ({', '.join(SAMPLE_PRESETS)}: {PAPER_FID.describe()}, into an .npz); options "
                     "given explicitly override it.")]


def sample(
    model: ModelOpt = None, image_size: ImageSizeOpt = None, ckpt: CheckpointOpt = None,
    class_: ClassOpt = None, num_per_class: NumPerClassOpt = None, num: NumOpt = None,
    steps: StepsOpt = None, cfg: CfgOpt = None, guidance_channels: GuidedOpt = DEFAULT_CHANNELS,
    guidance_interval: IntervalOpt = None, sampler: SamplerOpt = None, eta: EtaOpt = None, seed: SeedOpt = 0,
    batch_size: BatchOpt = 32, out: OutOpt = None, npz: NpzOpt = None, vae: VaeOpt = None,
    device: DeviceOpt = "auto", precision: PrecisionOpt = DEFAULT_PRECISION, compile: CompileOpt = False,
    json_output: JsonOpt = False, deterministic: DeterministicOpt = False, offline: OfflineOpt = False,
    force: ForceOpt = False, preset: PresetOpt = None, weights: SampleWeightsOpt = None,
    dist_timeout: DistTimeoutOpt = DEFAULT_TIMEOUT_S,
):
    """Generate class-conditional images from a DiT checkpoint."""
    # Expand --preset (explicit options win), then check the numbers and the choice of model before any file is read
    # or written.
    settings, notes = expand_sample_preset(preset, sampler=sampler, steps=steps, cfg=cfg,
                                           guidance_channels=guidance_channels, vae=vae, precision=precision,
                                           num=num, num_per_class=num_per_class)
    sampler, steps, cfg, guidance_channels, precision, num = (
        settings[key] for key in ("sampler", "steps", "cfg", "guidance_channels", "precision", "num"))
    vae_from_preset = vae is None and settings["vae"] is not None
    check_counts(num, num_per_class, batch_size, steps, len(class_ or []))
    check_numbers(cfg, eta, seed, guidance_interval, guidance_channels)
    check_model_choice(model, image_size, ckpt)
    dtype = resolve_precision(precision)
    torch_device = rank_device(resolve_device(device))
    set_backend_flags(deterministic=deterministic)
    with distributed(torch_device, dist_timeout) as ranks, \
            collectives(ranks.rank, ranks.world, dist_timeout, "sampling"):
        quiet = json_output or ranks.rank != 0
        on_every_rank(lambda: check_outputs(out, npz), "cannot write the outputs",
                      "--out and --npz must be on a disk that all nodes share")

        # Find and read the checkpoint (rank 0 downloads, the others wait).
        with ranks.zero_first():
            checkpoint_path, entry = find_checkpoint(model, image_size, ckpt, offline, quiet)
        checkpoint = read_checkpoint(checkpoint_path, model, weights)
        model_config = checkpoint.config

        # Check everything cheap (sampler, guidance, classes, sizes, outputs) before the codec loads.
        defaults = checkpoint.sampling or (entry.sampling if entry else DIT_SAMPLING)
        guidance = make_guidance(cfg if cfg is not None else defaults.cfg, guidance_channels, guidance_interval,
                                 model_config)
        sampler, steps = sampler or defaults.sampler, steps or defaults.steps
        if eta is not None and sampler != "ddim":
            raise UserError(f"--eta only applies to --sampler ddim, and this run uses {sampler}",
                            "add --sampler ddim, or drop --eta")
        eta = eta or 0.0
        plan = plan_sampler(sampler, steps, model_config.learn_sigma, eta, schedule=checkpoint.schedule)
        vae = vae_choice(checkpoint, settings["vae"], vae_from_preset, notes)
        names = class_table(model_config.num_classes, checkpoint.class_names)
        labels, columns = plan_run(names, model_config.num_classes, class_, num_per_class, num, seed)
        config = GenerateConfig(tuple(labels), seed, sampler, steps, eta, guidance, batch_size, precision, compile,
                                checkpoint.schedule)
        check_image_size(checkpoint, image_size if ckpt is not None else None, vae)
        warnings = weight_warnings(checkpoint, show=not quiet)

        # Load the codec (rank 0 first: it may download) and check it fits the model.
        with ranks.zero_first():
            codec = codec_from_dict(checkpoint.codec, torch_device, model_config.in_channels, vae, is_offline(offline))
        check_codec(checkpoint, codec, image_size if ckpt is not None else None)

        # Prepare the outputs, then sample this process's share under a progress bar.
        net = checkpoint.build(torch_device)
        sha256 = file_sha256(checkpoint_path)
        run_key = config.run_key(sha256, codec.to_dict())
        default = default_out_dir(entry.model if entry else checkpoint_path.stem, config, run_key)
        if preset is not None and npz is None:
            npz = default.with_name(f"{default.name}-{preset}.npz")
        if out is None and npz is None:
            out = default
        provenance = make_provenance(entry.model if entry else describe(model_config), checkpoint_path, sha256,
                                     checkpoint, config, plan.nfe, codec, dtype, torch_device, deterministic, run_key,
                                     cfg is not None)
        provenance["preset"] = preset
        if preset is not None and not quiet:
            show_preset(preset, config, codec, npz, out, notes)
        writers = make_writers(out, npz, names, config, run_key, force, provenance, columns, ranks)
        with ProgressBar(None, "sampling", unit="img", enabled=not quiet) as bar:
            summary = sample_run(net, codec, config, torch_device, writers, ranks, provenance,
                                 on_batch=lambda batch: bar.advance(len(batch.indices), nfe=batch.nfe),
                                 on_step=bar.step, on_plan=lambda n: bar.update(0, total=n) if n else bar.discard())
        if ranks.rank == 0:
            report(summary, out, npz, run_key, json_output, checkpoint.weights, warnings)


def expand_sample_preset(preset: str | None, **options) -> tuple[dict, list[str]]:
    """The options with --preset filled in under them; options left at their defaults count as not given."""
    if preset is None:
        return options, []
    given = {**options, "guidance_channels": None if options["guidance_channels"] == DEFAULT_CHANNELS
             else options["guidance_channels"],
             "precision": None if options["precision"] == DEFAULT_PRECISION else options["precision"]}
    return expand_preset(preset, given)


def vae_choice(checkpoint: Checkpoint, vae: str | None, from_preset: bool, notes: list[str]) -> str | None:
    """The --vae to use; a preset's VAE is dropped, with a note, for a pixel-space model, which has none."""
    if from_preset and (checkpoint.codec or {}).get("kind") == "pixel":
        notes.append(f"the model is pixel-space, so the preset's {vae} VAE does not apply")
        return None
    return vae


def show_preset(preset: str, config: GenerateConfig, codec, npz: Path | None, out: Path | None,
                notes: list[str]) -> None:
    """The preset as the options it stands for, then one note per explicit override."""
    codec_name = codec.to_dict().get("vae", "none (pixel model)")
    where = " ".join(f"{flag} {path}" for flag, path in (("--npz", npz), ("--out", out)) if path is not None)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"--preset {preset}: --sampler {config.sampler} --steps {config.steps} --cfg "
                  f"{config.guidance.scale:g} --guidance-channels {config.guidance.channels} --vae {codec_name} "
                  f"--precision {config.precision} --num-images {config.num_images} (uniformly random classes) "
                  f"{where}", markup=False)
    for note in notes:
        console.print(f"note: {note}", markup=False)


MAX_IMAGES = 10_000_000  # 200 ImageNet FID-50k runs; a bound so a typo fails at once, not after building labels
MAX_STEPS = 10_000
MAX_SEED = 2**63 - 1
MAX_CFG = 100.0  # far past any useful scale; larger ones only overflow the guided eps


def check_counts(num: int | None, num_per_class: int | None, batch_size: int, steps: int | None,
                 num_classes_asked: int = 0) -> None:
    for flag, value, high in (("--num", num, MAX_IMAGES), ("--num-per-class", num_per_class, MAX_IMAGES),
                              ("--batch-size", batch_size, MAX_IMAGES), ("--steps", steps, MAX_STEPS)):
        if value is not None and not 1 <= value <= high:
            raise UserError(f"{flag} must be between 1 and {high:,}, got {value:,}",
                            f"pass {flag} {min(max(value, 1), high)}")
    if num is not None and num_per_class is not None:
        raise UserError("--num and --num-per-class exclude each other",
                        "--num draws random classes, --num-per-class repeats each --class")
    if num_per_class is not None and not num_classes_asked:
        raise UserError("--num-per-class needs --class", "name the classes, or use --num for random classes")
    if num_per_class is not None and num_per_class * num_classes_asked > MAX_IMAGES:
        raise UserError(f"--num-per-class {num_per_class:,} for {num_classes_asked} classes is more than "
                        f"{MAX_IMAGES:,} images", "ask for fewer images per class")


def check_numbers(cfg: float | None, eta: float | None, seed: int, interval: str | None,
                  guidance_channels: str = "paper") -> None:
    """The float options and the seed, each named, before anything is loaded."""
    if cfg is not None and not (math.isfinite(cfg) and 0 <= cfg <= MAX_CFG):
        raise UserError(f"--cfg {cfg:g} is out of range",
                        f"pass a scale in [0, {MAX_CFG:g}]: 1 disables guidance, 0 is unconditional, DiT uses 1.5-4")
    if eta is not None and not (math.isfinite(eta) and 0 <= eta <= 1):
        raise UserError(f"--eta {eta:g} is out of range", "pass a number in [0, 1]: 0 is deterministic DDIM")
    if guidance_channels not in GUIDED_CHANNELS:
        raise UserError(f"unknown --guidance-channels {guidance_channels!r}", f"choose {' or '.join(GUIDED_CHANNELS)}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {seed}", "pass e.g. --seed 0")
    parse_interval(interval)


def check_model_choice(model: str | None, image_size: int | None, ckpt: Path | None) -> None:
    """Refuse options that the chosen weights would silently ignore."""
    if ckpt is not None and model in registry_models() and model not in preset_names():
        raise UserError(f"--model {model} names released weights, but --ckpt {ckpt} gives the weights",
                        "drop --model, or drop --ckpt to use the released weights")
    if ckpt is None and image_size is not None and model in registry_models() and \
            known_weights(model).image_size is None:
        raise UserError(f"--model {model} comes in one size, so --image-size does not apply", "drop --image-size")


def read_checkpoint(path: Path, model: str | None, weights: str | None) -> Checkpoint:
    """The checkpoint, checked against a --model preset and the --weights asked for."""
    checkpoint = load_checkpoint(path, num_heads=preset_heads(model), weights=weights)  # refuses a missing set
    check_preset(model, checkpoint)
    return checkpoint


def weight_warnings(checkpoint: Checkpoint, show: bool) -> list[str]:
    """An EMA that has not yet moved from its start samples noise; say so (on stderr) before sampling."""
    stale = checkpoint.ema.staleness() if checkpoint.ema is not None and checkpoint.weights == "ema" else None
    if stale and show:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"warning: {stale}", markup=False)
    return [stale] if stale else []


def find_checkpoint(model: str | None, image_size: int | None, ckpt: Path | None, offline: bool,
                    quiet: bool) -> tuple[Path, KnownWeights | None]:
    """--ckpt (a path, or a hub id fetched into the Hugging Face cache) wins; otherwise a known model is found in the
    weights folders or downloaded."""
    if ckpt is not None:
        entry = known_weights(model, image_size) if model in registry_models() else None
        return resolve_source(ckpt, is_offline(offline)), entry
    model = model or DEFAULT_MODEL
    entry = known_weights(model, image_size) if model in registry_models() else None
    if entry is None:
        if model in preset_names():
            raise UserError(f"there are no released weights for {model}", "pass --ckpt with your checkpoint")
        choices = dict.fromkeys(registry_models() + preset_names())
        raise UserError(f"unknown --model {model!r}", f"choose from {', '.join(choices)}")
    with byte_progress(f"downloading {entry.filename}", enabled=not quiet) as progress:
        return resolve_weights(entry, offline, progress), entry


def preset_heads(model: str | None) -> int | None:
    return PRESET_SHAPES[model.split("/")[0]]["num_heads"] if model in preset_names() else None


def check_preset(model: str | None, checkpoint: Checkpoint) -> None:
    if model not in preset_names():
        return
    base, patch = model.split("/")
    shape, config = PRESET_SHAPES[base], checkpoint.config
    if (config.depth, config.hidden_size, config.patch_size) != (shape["depth"], shape["hidden_size"], int(patch)):
        raise UserError(f"--model {model} does not match the checkpoint, which holds {describe(config)}",
                        "drop --model or pass the matching preset")


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


def make_guidance(scale: float, channels: str, interval: str | None, model_config) -> Guidance:
    """The guidance settings, checked against what the model can do (a null class for any scale but 1)."""
    if scale < 0:
        raise UserError(f"--cfg must be >= 0, got {scale:g}", "1 disables guidance, 0 is unconditional")
    if model_config.num_classes == 0:
        return Guidance(1.0, channels)  # a model trained without labels has nothing to guide
    guidance = Guidance(scale, channels, parse_interval(interval))
    check_guidance(model_config, guidance)
    return guidance


def parse_interval(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--guidance-interval {text!r} is not LOW,HIGH", "for example --guidance-interval 0,700") \
            from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
        raise UserError(f"--guidance-interval {text!r} is not an interval of training timesteps",
                        "pass LOW,HIGH with 0 <= LOW <= HIGH, for example --guidance-interval 0,700")
    return low, high


def plan_run(names: ClassTable, num_classes: int, classes: list[str] | None, num_per_class: int | None,
             num: int | None, seed: int) -> tuple[list[int], int | None]:
    """Each image's class, and the grid width: one row per class for several --class, else a square grid."""
    if num_classes == 0:
        if classes:
            raise UserError("this model is unconditional (trained without labels)", "drop --class")
        return [0] * (num or DEFAULT_NUM), None
    ids = [names.resolve(text) for text in classes or []]
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


def make_provenance(model_name: str, path: Path, sha256: str, checkpoint: Checkpoint, config: GenerateConfig,
                    nfe: int, codec, dtype: torch.dtype, device: torch.device, deterministic: bool, run_key: str,
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
        "codec": codec.to_dict(), "precision": str(dtype).removeprefix("torch."), "device": str(device),
        "deterministic": deterministic, "tf32": torch.backends.cuda.matmul.allow_tf32,
        "seed": config.seed, "num_images": config.num_images,
        "image_seeds": "image i: noise from torch.Generator().manual_seed(ditcli.samplers.image_seed(seed, i)), "
                       "random class from ditcli.generate.random_labels",
        "labels": list(config.labels), "run_key": run_key, "ditcli": __version__, "torch": torch.__version__,
    }


def report(summary, out: Path | None, npz: Path | None, run_key: str, json_output: bool, weights: str,
           warnings: list[str]) -> None:
    result = {"out": str(out) if out else None, "npz": str(npz) if npz else None, "images": summary.total,
              "generated": summary.generated, "skipped": summary.skipped, "nfe": summary.nfe,
              "seconds": round(summary.seconds, 3), "images_per_second": summary.images_per_second,
              "files": summary.files, "run_key": run_key, "weights": weights, "warnings": warnings}
    if json_output:
        typer.echo(json.dumps(result))
        return
    where = ", ".join(str(p) for p in (out, npz) if p is not None)
    rate = f", {summary.images_per_second:.3g} img/s" if summary.images_per_second else ""
    skipped = f" ({summary.skipped} already done)" if summary.skipped else ""
    nfe = f", NFE {summary.nfe} per image" if summary.nfe else ""
    source = "EMA" if weights == "ema" else "raw (non-EMA)"
    Console(highlight=False, soft_wrap=True).print(
        f"wrote {summary.total} images to {where}{skipped}{nfe}{rate}, from the {source} weights", markup=False)


def classes(
    search: SearchOpt = None, ckpt: CheckpointOpt = None, model: ModelOpt = None, image_size: ImageSizeOpt = None,
    json_output: JsonOpt = False, offline: OfflineOpt = False,
):
    """Print the class names of ImageNet-1k or of a checkpoint."""
    check_model_choice(model, image_size, ckpt)
    if image_size is not None and (ckpt is not None or model in (None, DEFAULT_MODEL)):
        source = f"--ckpt {ckpt}" if ckpt is not None else f"{DEFAULT_MODEL} (ImageNet-1k at every size)"
        raise UserError(f"--image-size does not change the class names of {source}", "drop --image-size")
    if ckpt is None and model in (None, DEFAULT_MODEL):
        table = ClassTable.imagenet()
    else:
        path, _ = find_checkpoint(model, image_size, ckpt, offline, quiet=json_output)
        checkpoint = load_checkpoint(path, num_heads=preset_heads(model))
        table = class_table(checkpoint.config.num_classes, checkpoint.class_names)
    rows = table.search(search)
    if json_output:
        typer.echo(json.dumps([{"id": c.id, "wnid": c.wnid, "names": list(c.names)} for c in rows]))
        return
    if not rows:
        raise UserError(f"no class matches {search!r}", f"{len(table)} classes in {table.source}; try a shorter text")
    grid = Table("id", *(["wnid"] if table.by_wnid else []), "names", title=f"{table.source} classes", box=None)
    for info in rows:
        grid.add_row(str(info.id), *([info.wnid or ""] if table.by_wnid else []), ", ".join(info.names))
    Console(highlight=False).print(grid)
