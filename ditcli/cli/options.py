"""Options shared by several commands, declared once."""

import copy
from pathlib import Path
from typing import Annotated, get_args

import typer

from ditcli.weights.locate import DEFAULT_MODEL
from ditcli.weights.registry import registry_models

DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", help="Global seed; each image (sampling) or step (training) draws from a generator derived from it.")]
CheckpointOpt = Annotated[Path | None, typer.Option(
    "--ckpt", help="A .pt or .safetensors DiT checkpoint, a `dit train` run folder (its newest ckpt-*.pt), a diffusers "
                   "folder, or a hub id org/name[@revision].")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32, bf16 or fp16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable results.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]
DistTimeoutOpt = Annotated[float, typer.Option(
    "--dist-timeout", help="Under torchrun: seconds a rank waits for the others in one collective before it stops "
                           "with an error naming the rank.")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help=f"A known checkpoint ({', '.join(registry_models())}) or, with --ckpt, a preset "
                    f"(DiT-S/2 ... DiT-XL/8). Default: {DEFAULT_MODEL}.")]
ImageSizeOpt = Annotated[int | None, typer.Option(
    "--image-size", help="256 or 512: which released DiT-XL/2. Default: 256, or the size --ckpt's model makes.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never download (also DIT_OFFLINE=1 or HF_HUB_OFFLINE=1).")]
ObjectiveOpt = Annotated[str | None, typer.Option(
    "--objective", help="ddpm, flow or meanflow: what a checkpoint from elsewhere (SiT, REPA, the MeanFlow port, "
                        "DMF) was trained with; files that record it (ours, converted ones) need none.")]
TimeDirectionOpt = Annotated[str | None, typer.Option(
    "--time-direction", help="A flow or mean-flow model's time: noise-to-data (SiT: t = 1 is data) or data-to-noise "
                             "(REPA, MeanFlow, DMF).")]
NumHeadsOpt = Annotated[int | None, typer.Option(
    "--num-heads", help="Attention heads of a bare state dict, for widths outside the presets; a file whose config "
                        "records its heads must agree. Default: the file's record, else the preset of its width.",
    show_default=False)]
DecoupledDepthOpt = Annotated[int | None, typer.Option(
    "--decoupled-depth", help="A Decoupled MeanFlow (DMF) checkpoint's K: blocks[:K] see t, the later blocks and the "
                              "final layer r. Its tensors cannot tell it; files that record it (ours, converted ones) "
                              "need none.", show_default=False)]


def in_panel(alias, panel: str):
    """A shared option shown under `panel` in one command's --help (`dit train` groups its options in panels)."""
    kind, info = get_args(alias)
    info = copy.copy(info)
    info.rich_help_panel = panel
    return Annotated[kind, info]
