"""`dit convert`: builds the conversion request from options, calls ditcli.weights.convert and renders its report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ditcli.cli.options import (
    DecoupledDepthOpt,
    JsonOpt,
    NumHeadsOpt,
    ObjectiveOpt,
    TimeDirectionOpt,
)
from ditcli.diffusion.guidance import DEFAULT_CHANNELS, GUIDED_CHANNELS
from ditcli.diffusion.objectives import objective_from_options, objective_from_record
from ditcli.diffusion.samplers import FLOW_MAP, FLOW_SAMPLER_NAMES, SAMPLERS
from ditcli.errors import UserError
from ditcli.io import check_creatable
from ditcli.runtime import PRECISIONS
from ditcli.sampling.request import parse_interval
from ditcli.weights.checkpoint import WEIGHT_CHOICES
from ditcli.weights.convert import OUTPUT_FORMATS, ConversionReport, SamplingChoice
from ditcli.weights.convert import convert as convert_weights
from ditcli.weights.convert import info as describe_file

SourceArg = Annotated[Path | None, typer.Argument(help="A released .pt, a train.py or ditcli checkpoint, our "
                                                       ".safetensors, a diffusers folder or file, or a hub id "
                                                       "org/name[@revision].",
                                                  show_default=False)]
DestArg = Annotated[Path | None, typer.Argument(help="The .safetensors file or diffusers folder to write.",
                                                show_default=False)]
ToOpt = Annotated[str | None, typer.Option("--to", help=f"{' or '.join(OUTPUT_FORMATS)}; by default from DST's "
                                                        "name (*.safetensors).", show_default=False)]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help=f"Stored dtype: {', '.join(PRECISIONS)}. Default: fp32.",
                                              show_default=False)]
WeightsOpt = Annotated[str | None, typer.Option(
    "--weights", help=f"From training checkpoints: {' or '.join(WEIGHT_CHOICES)}. A file with one set of weights must "
                      "hold the set named. Default: ema.", show_default=False)]
OverwriteOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing DST.")]
DiffusersVaeOpt = Annotated[str | None, typer.Option(
    "--vae", help="With --to diffusers: the VAE to include (a local AutoencoderKL folder, a hub id, ema or mse), "
                  "'auto' for the checkpoint's own, or 'none'. A pixel-space model has none, and DiTPipeline cannot "
                  "sample it: its export needs --vae none (the transformer alone). Default: auto.",
    show_default=False)]
InfoOpt = Annotated[Path | None, typer.Option("--info", metavar="FILE", help="Describe FILE or a hub id instead of "
                                                                          "converting.",
                                              show_default=False)]

RecordSamplerOpt = Annotated[str | None, typer.Option(
    "--sampler", help=f"Record the sampler `dit sample` uses by default (DDPM models: {', '.join(SAMPLERS)}; flow "
                      f"models: {', '.join(FLOW_SAMPLER_NAMES)}; mean-flow models: {FLOW_MAP} or those of flow "
                      "models; not --steps with dopri5, which chooses its own). Default: the source's.",
    show_default=False)]
RecordStepsOpt = Annotated[int | None, typer.Option(
    "--steps", help="Record the default sampling steps (>= 1). Default: the source's.", show_default=False)]
RecordCfgOpt = Annotated[float | None, typer.Option(
    "--cfg", help="Record the default guidance scale (>= 0; 1 is none). Default: the source's.", show_default=False)]
RecordIntervalOpt = Annotated[str | None, typer.Option(
    "--guidance-interval", help="Record the default guidance interval: LOW,HIGH in training timesteps (a flow model's "
                                "time in [0, 1]), or 'none' to guide every step. Default: the source's.",
    show_default=False)]
RecordChannelsOpt = Annotated[str | None, typer.Option(
    "--guidance-channels", help=f"Record the default guided channels: {' or '.join(GUIDED_CHANNELS)}. Default: the "
                                f"source's (none recorded: {DEFAULT_CHANNELS}).", show_default=False)]

# How each mean-flow form sees its second time r, for `--info`.
FORM_NOTES = {"separate": "MeanFlow: t_embedder(t) + r_embedder(t - r) condition every block",
              "decoupled": "DMF: the first K blocks see t, the later blocks and the final layer r"}

console = Console(highlight=False, soft_wrap=True)


def convert(
    src: SourceArg = None,
    dst: DestArg = None,
    to: ToOpt = None,
    dtype: DtypeOpt = None,
    weights: WeightsOpt = None,
    force: OverwriteOpt = False,
    num_heads: NumHeadsOpt = None,
    vae: DiffusersVaeOpt = None,
    info: InfoOpt = None,
    json_out: JsonOpt = False,
    objective: ObjectiveOpt = None,
    time_direction: TimeDirectionOpt = None,
    sampler: RecordSamplerOpt = None,
    steps: RecordStepsOpt = None,
    cfg: RecordCfgOpt = None,
    guidance_interval: RecordIntervalOpt = None,
    guidance_channels: RecordChannelsOpt = None,
    decoupled_depth: DecoupledDepthOpt = None,
):
    """Convert DiT weights between official, training, safetensors and diffusers formats; check the result."""
    spec = objective_from_options(objective, time_direction)
    sampling = SamplingChoice(sampler=sampler, steps=steps, cfg=cfg, interval=parse_interval(guidance_interval),
                              set_interval=guidance_interval is not None, channels=guidance_channels)
    if info is not None:
        if src is not None or dst is not None:
            raise UserError("--info takes one FILE and no SRC/DST", "run `dit convert --info FILE` on its own")
        _refuse_with_info(sampling.given() + [flag for flag, value in (("--to", to), ("--dtype", dtype),
                                                                        ("--vae", vae), ("--force", force or None))
                                              if value is not None])
        _render_info(describe_file(info, num_heads=num_heads, weights=weights, objective=spec,
                                   decoupled_depth=decoupled_depth), json_out)
        return
    if src is None or dst is None:
        raise UserError("convert needs SRC and DST", "run `dit convert SRC DST`, or `dit convert --info FILE`")
    fmt = to or ("safetensors" if dst.suffix == ".safetensors" else None)  # unknown formats are refused later
    if fmt in ("safetensors", "diffusers"):
        check_creatable(dst, "DST", "folder" if fmt == "diffusers" else "file")
    if vae not in (None, "none") and fmt == "safetensors":
        raise UserError("--vae only applies to --to diffusers: a .safetensors file holds the DiT alone",
                        "drop --vae, or write a diffusers folder with --to diffusers")
    report = convert_weights(src, dst, to=to, dtype=dtype or "fp32", weights=weights, num_heads=num_heads,
                             vae=None if vae == "none" else vae or "auto", force=force, objective=spec,
                             sampling=sampling, decoupled_depth=decoupled_depth)
    if not json_out and report.source != str(src):
        console.print(f"note: {src} is a dit train run folder: converted its newest checkpoint, "
                      f"{Path(report.source).name}", markup=False)
    _render_report(report, json_out)


def _refuse_with_info(given: list[str]) -> None:
    """--info reads a file and writes nothing, so the options of a conversion do not apply to it."""
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise UserError(f"--info describes a file and writes nothing, so {', '.join(given)} {verb} not apply",
                        f"drop {', '.join(given)}, or convert with `dit convert SRC DST`")


def _render_info(data: dict, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, box=None)
    ema = {True: "yes", False: "no", None: "not recorded"}[data["ema"]]
    objective = objective_from_record(**data["objective"])
    form = [] if data["form"] is None else [
        ("mean-flow form", f"{data['form']} ({FORM_NOTES[data['config']['mean_flow_form']]})")]
    rows = [("format", data["format"]), ("model", data["model"]), ("parameters", f"{data['parameters']:,}"),
            ("dtype", ", ".join(data["dtype"])), ("weights", data["weights"]), ("EMA", ema),
            ("classes", str(data["config"]["num_classes"])),
            ("class names", str(data["class_names"]) if data["class_names"] is not None else "none"),
            ("codec", json.dumps(data["codec"]) if data["codec"] else "none"),
            ("timestep convention", f"{data['timestep_convention']} ({data['convention_source']})"),
            ("schedule", objective.schedule_text(data["schedule"])),
            ("objective", f"{objective.describe()} ({data['objective_source']})"),
            *form,
            ("sampling", json.dumps(data["sampling"]) if data["sampling"] else "not recorded"),
            ("EMA record", json.dumps(data["ema_record"]) if data["ema_record"] else "not recorded"),
            ("config", json.dumps(data["config"]))]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    for group in data["dropped"]:
        console.print(f"dropped: {group}")
    for warning in data["warnings"]:
        console.print(f"warning: {warning}", style="yellow")


def _weights_parity(trip: dict) -> str:
    if trip["identical_weights"]:
        return "bit-exact"
    if trip["differing"] and trip["differing"] == trip["expected_differences"]:
        return ("equal to the source but for its rounded pos_embed table, which diffusers recomputes exactly "
                "(expected)")
    return f"NOT equal to the source ({', '.join(trip['differing'][:3]) or 'different keys'} differ)"


def _render_report(report: ConversionReport, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    console.print(f"wrote {report.destination} ({report.to}, {report.dtype}, {report.weights} weights) from "
                  f"{report.source_format}: {report.model}")
    trip = report.parity["roundtrip"]
    weights = _weights_parity(trip)
    rounding = f", {report.dtype} rounding" if report.dtype != "fp32" else ""
    console.print(f"parity: weights read back {weights} (as {report.dtype}); fixed-seed forward max |source - result| "
                  f"= {trip['max_abs_diff']:.3g} (outputs up to {trip['max_abs_output']:.3g}{rounding})")
    if "diffusers" in report.parity:
        drift = report.parity["diffusers"]
        why = ("expected (its timestep frequencies differ from the reference; see docs/formats.md)"
               if drift["expected"] else "(the model keeps diffusers' timestep convention)")
        console.print(f"diffusers' own model: max |source - diffusers| = {drift['max_abs_diff']:.3g}, {why}")
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow")
