"""`dit fid`: ADM's FID, sFID, Inception Score, precision and recall, or `--make-ref` to build a reference batch."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image
from rich.console import Console
from rich.table import Table

from ditcli.cli.options import DeviceOpt, JsonOpt
from ditcli.cli.progress import ProgressBar, StageBars
from ditcli.errors import UserError
from ditcli.evaluation.features import DINOV2, INCEPTION
from ditcli.evaluation.inception import WEIGHTS_NAME
from ditcli.io import check_creatable

InceptionWeightsOpt = Annotated[Path | None, typer.Option(
    "--inception-weights", help=f"torch-fidelity's {WEIGHTS_NAME}; default: the cache ($DIT_HOME or ~/.cache/ditcli), "
                                "downloading it once.")]
Dinov2WeightsOpt = Annotated[str | None, typer.Option(
    "--dinov2-weights", metavar="PATH|URL",
    help="With --features dinov2: a torch-hub DINOv2 checkpoint, or a URL downloaded once into the cache; default: "
         "the released ViT-L/14 (dinov2_vitl14_pretrain.pth, size and sha256 checked).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward; the scores don't depend on it.")]
WorkersOpt = Annotated[int, typer.Option("--num-workers", help="Threads decoding folder images.")]


SamplesArg = Annotated[Path | None, typer.Argument(
    help="Samples: an ADM .npz (arr_0 uint8 NHWC), a folder of images or a `dit sample` output folder.")]
RefOpt = Annotated[Path | None, typer.Option(
    "--ref", help="Reference: an ADM .npz (e.g. VIRTUAL_imagenet256_labeled.npz) or a folder of images.")]
MakeRefOpt = Annotated[str | None, typer.Option(
    "--make-ref", metavar="DATA",
    help="Build an ADM-format reference .npz (write it with -o) from any `dit train --data` source: an image folder, "
         "an .npz, a folder of idx files or 'fashion-mnist'.")]
SplitOpt = Annotated[str | None, typer.Option(
    "--split", help="With --make-ref on idx data (fashion-mnist, a folder of idx files): train (default) or test.")]
OutputOpt = Annotated[Path | None, typer.Option("-o", "--output", help="Where --make-ref writes the .npz.")]
ResizeOpt = Annotated[int | None, typer.Option(
    "--resize", help="Center-crop images to N x N as ADM does (required for mixed sizes; --make-ref defaults to 256 "
                     "for an image folder and keeps the size of other data).")]
FeaturesOpt = Annotated[str | None, typer.Option(
    "--features", help="inception, a registered extractor name, a TorchScript .pt file or a tagged .safetensors file "
                       "(see docs/evaluation.md). Default: the extractor the reference was made with (--make-ref "
                       "records it; ADM's batches are inception's); with --make-ref, inception.")]
ReplaceRefOpt = Annotated[bool, typer.Option("--force", help="Let --make-ref replace an existing -o file.")]
NoPrOpt = Annotated[bool, typer.Option(
    "--no-pr", help="Skip precision and recall: their k-nearest-neighbour radii over a large reference take minutes "
                    "on a CPU (a 60,000-image reference: 1 min 52 s of a 5 min 6 s run on 2 cores). FID, sFID, IS "
                    "and KID are unchanged.")]
# The units of the stages `evaluate` and `make_ref` report; the others count images.
STAGE_UNITS = {"Frechet distance": "scores", "precision/recall": "blocks", "KID": "subsets"}


class FidStages(StageBars):
    """One bar per stage of the scoring, each in its own unit: images, then scores, distance blocks, KID subsets."""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = ProgressBar(total, f"{stage:<16}", unit=STAGE_UNITS.get(stage, "img"), enabled=self.enabled)
            self.bar.__enter__()
        self.bar.update(done)


def fid(
    samples: SamplesArg = None, ref: RefOpt = None, make_ref: MakeRefOpt = None, split: SplitOpt = None,
    output: OutputOpt = None, resize: ResizeOpt = None, batch_size: BatchSizeOpt = 64, device: DeviceOpt = "auto",
    inception_weights: InceptionWeightsOpt = None, features: FeaturesOpt = None,
    num_workers: WorkersOpt = min(4, os.cpu_count() or 1), force: ReplaceRefOpt = False, json_output: JsonOpt = False,
    no_pr: NoPrOpt = False, dinov2_weights: Dinov2WeightsOpt = None,
):
    """Score samples against a reference: FID, sFID, IS, precision and recall, as ADM's evaluator."""
    from ditcli.evaluation.fid import FidConfig, check_fid_mode, check_options, evaluate
    from ditcli.evaluation.references import make_ref as make_reference
    from ditcli.runtime import resolve_device, set_backend_flags

    if inception_weights is not None and features not in (None, INCEPTION):
        raise UserError("--inception-weights only applies to --features inception",
                        "drop --inception-weights, or pass --features inception")
    if dinov2_weights is not None and features not in (None, DINOV2):
        raise UserError("--dinov2-weights only applies to --features dinov2",
                        "drop --dinov2-weights, or pass --features dinov2")
    check_fid_mode(samples, ref, make_ref, output, split)
    unused = [flag for flag, given in (("-o", output is not None), ("--force", force)) if given]
    if make_ref is None and unused:
        raise UserError(f"{unused[0]} only applies to --make-ref, which writes a reference; scoring writes nothing",
                        f"drop {unused[0]}")
    if no_pr and make_ref is not None:
        raise UserError("--no-pr applies to scoring, and --make-ref only builds a reference", "drop --no-pr")
    check_options(batch_size, num_workers, resize)
    if make_ref is not None:
        check_creatable(output, "-o", "file")
        if output.exists() and not force:
            raise UserError(f"{output} already exists", "choose another -o, or pass --force to replace it")
    torch_device = resolve_device(device)
    # TF32 would round the features more coarsely than the float32 graph does; autotuning may change the kernels.
    set_backend_flags(allow_tf32=False, autotune=False)

    with FidStages(enabled=not json_output) as bars, warnings.catch_warnings():
        # PIL warns of a huge image and decodes it anyway; the readers turn the warning into a one-line error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if make_ref is not None:
            result = make_reference(make_ref, output, resize, features, inception_weights, torch_device,
                                      batch_size, num_workers, bars, split, dinov2_weights=dinov2_weights)
        else:
            config = FidConfig(samples, ref, batch_size, features, inception_weights, resize, num_workers,
                               precision_recall=not no_pr, dinov2_weights=dinov2_weights)
            result = evaluate(config, torch_device, bars)

    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    out = Console(highlight=False, soft_wrap=True)  # each warning stays one line
    if make_ref is not None:
        out.print(_reference_table(result))
    else:
        out.print(_score_table(result, no_pr))
        out.print(f"{result.num_samples} samples, {result.features} features; reference: {result.ref_stats}")
        out.print(_protocol_line(result), markup=False)
    for warning in result.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}")


def _protocol_line(result) -> str:
    """How the samples were drawn (from their provenance) and, where one applies, the published protocol."""
    settings = result.protocol
    if settings is None:
        return "protocol: unknown (no `dit sample` provenance beside the samples)"
    cfg = "no guidance" if settings["cfg"] is None else f"cfg {settings['cfg']:g} on {settings['guidance_channels']} " \
                                                         "channels"
    line = (f"protocol: {settings['steps']} {settings['sampler']} steps, {cfg}, VAE {settings['vae']}, "
            f"{settings['precision']}, {result.num_samples:,} images")
    if settings["preset"]:
        line += f" (--preset {settings['preset']})"
    if settings["paper"]:
        count = len(settings["deviations"])
        agrees = "matches" if not count else f"differs in {count} setting{'s' if count > 1 else ''} from"
        line += f"; {agrees} the paper's ({settings['paper_protocol']}; {settings['paper']})"
    return line


def _score_table(result, no_pr: bool = False) -> Table:
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value, digits in (("FID", result.fid, 4), ("sFID", result.sfid, 4), ("IS", result.inception_score, 2),
                                ("precision", result.precision, 4), ("recall", result.recall, 4)):
        missing = "skipped (--no-pr)" if no_pr and name in ("precision", "recall") else "-"
        table.add_row(name, missing if value is None else f"{value:.{digits}f}")
    table.add_row("KID", "-" if result.kid is None else f"{result.kid:.6f} ± {result.kid_std:.6f}")
    return table


def _reference_table(result) -> Table:
    table = Table()
    table.add_column("reference batch")
    table.add_column("value")
    for name, value in (("output", str(result.output)), ("images", str(result.num_images)),
                        ("resolution", f"{result.resolution}x{result.resolution}"), ("features", result.features)):
        table.add_row(name, value)
    return table
