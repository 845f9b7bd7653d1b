"""`dit sample`: parse options, build a SampleRequest, drive `sample_run` under a progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ditcli.cli.options import (
    CheckpointOpt,
    DecoupledDepthOpt,
    DeviceOpt,
    DistTimeoutOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelOpt,
    NumHeadsOpt,
    ObjectiveOpt,
    OfflineOpt,
    PrecisionOpt,
    SeedOpt,
    TimeDirectionOpt,
)
from ditcli.cli.progress import ProgressBar, downloads
from ditcli.diffusion.guidance import DEFAULT_CHANNELS, GUIDED_CHANNELS
from ditcli.diffusion.objectives import objective_from_options
from ditcli.diffusion.samplers import FLOW_MAP, FLOW_SAMPLER_NAMES, SAMPLERS
from ditcli.evaluation.protocol import PAPER_FID, SAMPLE_PRESETS
from ditcli.ranks import (
    DEFAULT_TIMEOUT_S,
    collectives,
    distributed,
    from_arguments,
    on_every_rank,
    rank_device,
)
from ditcli.runtime import resolve_device, set_backend_flags
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.forward import COMPILE_SECONDS
from ditcli.sampling.generate import sample_run
from ditcli.sampling.request import (
    DEFAULT_NUM,
    DEFAULT_PRECISION,
    PIXELS,
    SAMPLER_STEPS,
    SampleRequest,
    expand_sample_preset,
    prepare_run,
)
from ditcli.sampling.writers import check_outputs

ClassOpt = Annotated[list[str] | None, typer.Option(
    "--class", help="Class id, name or WordNet id, case-insensitive; repeat for several. See `dit classes`.")]
NumPerClassOpt = Annotated[int | None, typer.Option(
    "--num-per-class", help="Images per --class; without --class, of every class of the model. Default: 4 with "
                            "--class.")]
NumOpt = Annotated[int | None, typer.Option(
    "--num", "--num-images",
    help=f"Number of images, with uniform random classes (from --class if given). Under torchrun write --num-images: "
         f"torchrun takes --num for its own --numa-binding. Default: {DEFAULT_NUM}.")]
StepsOpt = Annotated[int | None, typer.Option(
    "--steps", help="Denoising steps. Default: the model's (DiT-XL/2: 250); a --sampler the model does not record "
                    f"takes its own ({', '.join(f'{name} {n}' for name, n in SAMPLER_STEPS.items())}).")]
CfgOpt = Annotated[float | None, typer.Option(
    "--cfg", help="Classifier-free guidance scale: 1 off, 0 unconditional, 1.5 for DiT-XL/2's FID. Default: the "
                  "model's (DiT-XL/2: 4; fashion-mnist: 1, its guidance trained in; fashion-mnist-flow: 3).")]
GuidedOpt = Annotated[str | None, typer.Option(
    "--guidance-channels", help=f"{' or '.join(GUIDED_CHANNELS)}: the first 3 latent channels, as published, or all. "
                                f"Default: the model's, else {DEFAULT_CHANNELS}.", show_default=False)]
IntervalOpt = Annotated[str | None, typer.Option(
    "--guidance-interval", help="LOW,HIGH: guide only in [LOW, HIGH], in training timesteps (e.g. 0,700) or a flow "
                                "model's time (e.g. 0,0.7); 'none' guides every step. Default: the model's.")]
SamplerOpt = Annotated[str | None, typer.Option(
    "--sampler", help=f"DDPM models: {', '.join(SAMPLERS)}; flow models: {', '.join(FLOW_SAMPLER_NAMES)}; mean-flow "
                      f"models: {FLOW_MAP} or those of flow models. Default: the model's.")]
TimeShiftOpt = Annotated[float | None, typer.Option(
    "--time-shift", help="Flow models: shift the step grid's noise levels s to S s / (1 + (S - 1) s) (> 0; > 1 puts "
                         "more steps at high noise). Default: 1.", show_default=False)]
AtolOpt = Annotated[float | None, typer.Option(
    "--atol", help="dopri5's absolute tolerance. Default: 1e-6 (SiT's).", show_default=False)]
RtolOpt = Annotated[float | None, typer.Option(
    "--rtol", help="dopri5's relative tolerance. Default: 1e-3 (SiT's).", show_default=False)]
EtaOpt = Annotated[float | None, typer.Option(
    "--eta", help="DDIM noise in [0, 1]: 0 deterministic, 1 DDPM-like. Only with --sampler ddim. Default: 0.",
    show_default=False)]
BatchOpt = Annotated[int, typer.Option(
    "--batch-size", help="Images per forward pass and process, rounded up to a multiple of 4 (see docs/samplers.md).")]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", help="Folder for PNGs, grid.png and provenance.json. Default: samples/<model>-<settings>.")]
NpzOpt = Annotated[Path | None, typer.Option(
    "--npz", help="Write all images as an ADM evaluator .npz (arr_0) plus a .provenance.json; PNGs and grid.png are "
                  "written only if --out is given too.")]
VaeOpt = Annotated[str | None, typer.Option(
    "--vae", help=f"ema, mse, a Hugging Face id or a local folder; '{PIXELS}' for a model that works in pixels (as "
                  "`dit train --vae none` trains), where a file from elsewhere does not say. Default: the model's "
                  "codec (a file without a record: the SD VAE ema).")]
DeterministicOpt = Annotated[bool, typer.Option(
    "--deterministic", help="No TF32, deterministic algorithms, no cuDNN autotuning.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace outputs of a different run instead of refusing.")]
SampleWeightsOpt = Annotated[str | None, typer.Option(
    "--weights", help="ema or model: which weights of a training checkpoint to sample. Default: ema.")]
SampleCompileOpt = Annotated[bool | None, typer.Option(
    "--compile/--no-compile", help="torch.compile the model with inductor freezing (compiled graphs cached in the "
                                   "user cache folder). Default: only when the job's forwards repay the compile time "
                                   "(provenance.json says which and why).", show_default=False)]
CacheOpt = Annotated[float | None, typer.Option(
    "--cache", help="Feature caching: skip all blocks but the first while its output's relative change, summed since "
                    "the last full forward, stays under this threshold, and reuse what they added then (0 runs every "
                    "block; 0.1 kept FD within 1-7 of the uncached one on the embedded model, 0.2 cost 35 FD: "
                    "docs/sampling.md). Runs eagerly. Default: off.", show_default=False)]
PresetOpt = Annotated[str | None, typer.Option(
    "--preset", help=f"A named protocol for DDPM models ({', '.join(SAMPLE_PRESETS)}: {PAPER_FID.describe()}, into "
                     "an .npz); options given explicitly override it.")]


def sample(
    model: ModelOpt = None, image_size: ImageSizeOpt = None, ckpt: CheckpointOpt = None,
    class_: ClassOpt = None, num_per_class: NumPerClassOpt = None, num: NumOpt = None,
    steps: StepsOpt = None, cfg: CfgOpt = None, guidance_channels: GuidedOpt = None,
    guidance_interval: IntervalOpt = None, sampler: SamplerOpt = None, eta: EtaOpt = None, seed: SeedOpt = 0,
    batch_size: BatchOpt = 32, out: OutOpt = None, npz: NpzOpt = None, vae: VaeOpt = None,
    device: DeviceOpt = "auto", precision: PrecisionOpt = DEFAULT_PRECISION, compile: SampleCompileOpt = None,
    json_output: JsonOpt = False, deterministic: DeterministicOpt = False, offline: OfflineOpt = False,
    force: ForceOpt = False, preset: PresetOpt = None, weights: SampleWeightsOpt = None,
    objective: ObjectiveOpt = None, time_direction: TimeDirectionOpt = None, time_shift: TimeShiftOpt = None,
    atol: AtolOpt = None, rtol: RtolOpt = None, cache: CacheOpt = None,
    dist_timeout: DistTimeoutOpt = DEFAULT_TIMEOUT_S, decoupled_depth: DecoupledDepthOpt = None,
    num_heads: NumHeadsOpt = None,
):
    """Generate class-conditional images from a DiT checkpoint."""
    # Expand --preset (explicit options win), then check the numbers and the choice of model before any file is read
    # or written.
    with from_arguments():  # the same options on every rank
        settings, notes = expand_sample_preset(preset, sampler=sampler, steps=steps, cfg=cfg,
                                               guidance_channels=guidance_channels, vae=vae, precision=precision,
                                               num=num, num_per_class=num_per_class)
        request = SampleRequest(
            model, image_size, ckpt, tuple(class_ or ()), num_per_class, settings["num"], settings["steps"],
            settings["cfg"], settings["guidance_channels"], guidance_interval, settings["sampler"], eta, seed,
            batch_size, out, npz, settings["vae"], vae is None and settings["vae"] is not None,
            settings["precision"], compile, deterministic, offline, force, preset, weights,
            objective_from_options(objective, time_direction), time_shift, atol, rtol, cache, tuple(notes),
            decoupled_depth, num_heads)
        request.check()
    torch_device = rank_device(resolve_device(device))
    set_backend_flags(deterministic=deterministic)
    with distributed(torch_device, dist_timeout) as ranks, \
            collectives(ranks.rank, ranks.world, dist_timeout, "sampling"):
        quiet = json_output or ranks.rank != 0
        on_every_rank(lambda: check_outputs(out, npz), "cannot write the outputs",
                      "--out and --npz must be on a disk that all nodes share")
        console = Console(stderr=True, highlight=False, soft_wrap=True)
        run = prepare_run(
            request, torch_device, ranks, downloads(not quiet),
            on_warning=lambda text: quiet or console.print(f"warning: {text}", markup=False),
            on_ready=lambda *shown: quiet or show_ready(console, preset, *shown))
        summary = sample_with_bar(run, torch_device, ranks, quiet, console)
        if ranks.rank == 0:
            report(summary, run.out, run.npz, run.run_key, json_output, run.weights, run.warnings)


def sample_with_bar(run, device, ranks, quiet: bool, console: Console):
    """`sample_run` under a progress bar. Under torchrun the bar counts rank 0's own images; the closing line gives the
    total of every rank. Ctrl-C ends it with one line saying what is on disk and that the same command resumes."""
    described = "sampling" if ranks.world == 1 else f"sampling (rank 0 of {ranks.world})"
    counted = {"planned": None, "done": 0}

    def on_batch(batch) -> None:
        counted["done"] += len(batch.indices)
        bar.advance(len(batch.indices), nfe=batch.nfe)

    def on_plan(n: int) -> None:
        counted["planned"] = n
        bar.update(0, total=n) if n else bar.discard()

    try:
        with ProgressBar(None, described, unit="img", enabled=not quiet) as bar:
            return sample_run(run.net, run.codec, run.config, device, run.writers, ranks, run.provenance,
                              on_batch=on_batch, on_step=bar.step, on_plan=on_plan, plan=run.plan)
    except KeyboardInterrupt:
        if ranks.rank == 0:
            console.print(interrupted_line(run, counted["planned"], counted["done"], ranks.world), markup=False)
        raise typer.Exit(130) from None


def interrupted_line(run, planned: int | None, done: int, world: int) -> str:
    """Ctrl-C's one line: how many images are written (earlier runs' included), where, and how to go on."""
    where = ", ".join(str(p) for p in (run.out, run.npz) if p is not None)
    total = run.config.num_images
    if planned is None:
        return f"interrupted before sampling began; nothing new was written to {where} (run the same command again)"
    if world > 1:
        return (f"interrupted: rank 0 wrote {done:,} of its {planned:,} images to {where}, each other rank its own "
                "share; run the same command again to resume with the rest")
    return (f"interrupted: {total - planned + done:,} of {total:,} images are written to {where}; run the same "
            "command again to resume with the rest")


def show_ready(console: Console, preset: str | None, config: GenerateConfig, codec, out: Path | None,
               npz: Path | None, notes: list[str]) -> None:
    """Before the writers start: a preset as the options it stands for, then one note per explicit override or choice
    made for the user (a run folder's newest checkpoint). A compiled run says so first: its build takes tens of
    seconds before the first batch, where the bar would otherwise sit still."""
    if config.compile:
        console.print(f"compiling the forward before the first batch (up to {COMPILE_SECONDS['cpu']:.0f} s on a CPU, "
                      "once: later runs load the package)", markup=False)
    if preset is None:
        for note in notes:
            console.print(f"note: {note}", markup=False)
        return
    codec_name = codec.to_dict().get("vae", "none (pixel model)")
    where = " ".join(f"{flag} {path}" for flag, path in (("--npz", npz), ("--out", out)) if path is not None)
    console.print(f"--preset {preset}: --sampler {config.sampler} --steps {config.steps} --cfg "
                  f"{config.guidance.scale:g} --guidance-channels {config.guidance.channels} --vae {codec_name} "
                  f"--precision {config.precision} --num-images {config.num_images} (uniformly random classes) "
                  f"{where}", markup=False)
    for note in notes:
        console.print(f"note: {note}", markup=False)


def report(summary, out: Path | None, npz: Path | None, run_key: str, json_output: bool, weights: str,
           warnings: list[str]) -> None:
    result = {"out": str(out) if out else None, "npz": str(npz) if npz else None, "images": summary.total,
              "generated": summary.generated, "skipped": summary.skipped, "nfe": summary.nfe,
              "seconds": round(summary.seconds, 3), "images_per_second": summary.images_per_second,
              "passes": summary.passes, "compile_seconds": summary.compile_seconds,
              "cache_reused": summary.reused_share,
              "files": summary.files, "run_key": run_key, "weights": weights, "warnings": warnings}
    if json_output:
        typer.echo(json.dumps(result))
        return
    where = ", ".join(str(p) for p in (out, npz) if p is not None)
    rate = f", {summary.images_per_second:.3g} img/s" if summary.images_per_second else ""
    skipped = f" ({summary.skipped} already done)" if summary.skipped else ""
    nfe = f", {nfe_text(summary.nfe, summary.passes)}" if summary.nfe else ""
    nfe += f" ({summary.reused_share:.0%} reused the cache)" if summary.reused_share is not None else ""
    source = "EMA" if weights == "ema" else "raw (non-EMA)"
    Console(highlight=False, soft_wrap=True).print(
        f"wrote {summary.total} images to {where}{skipped}{nfe}{rate}, from the {source} weights", markup=False)


def nfe_text(nfe: int | float, passes: int | float | None) -> str:
    """"NFE 9 per image", and where guided evaluations ran a doubled batch, how many forward passes that makes: the
    NFE counts a doubled [cond, uncond] batch once (docs/samplers.md), the passes twice."""
    text = f"NFE {nfe:g} per image"
    if passes is None or passes <= nfe:
        return text
    return (f"{text} ({passes:g} forward passes: {passes - nfe:g} of the {nfe:g} evaluations guided, each a doubled "
            "batch)")
