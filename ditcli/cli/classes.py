"""`dit classes`: the class names of ImageNet-1k or of a checkpoint, searchable, as a table or JSON."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ditcli.cli.options import (
    CheckpointOpt,
    DecoupledDepthOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelOpt,
    NumHeadsOpt,
    ObjectiveOpt,
    OfflineOpt,
    TimeDirectionOpt,
)
from ditcli.cli.progress import downloads
from ditcli.data.classes import ClassTable, class_table
from ditcli.diffusion.objectives import objective_from_options
from ditcli.errors import UserError
from ditcli.weights.locate import (
    DEFAULT_MODEL,
    check_model_choice,
    find_checkpoint,
    read_checkpoint,
)

SearchOpt = Annotated[str | None, typer.Option("--search", help="Show only classes whose id or names contain TEXT.")]


def classes(
    search: SearchOpt = None, ckpt: CheckpointOpt = None, model: ModelOpt = None, image_size: ImageSizeOpt = None,
    json_output: JsonOpt = False, offline: OfflineOpt = False, objective: ObjectiveOpt = None,
    time_direction: TimeDirectionOpt = None, decoupled_depth: DecoupledDepthOpt = None, num_heads: NumHeadsOpt = None,
):
    """Print the class names of ImageNet-1k or of a checkpoint.

    A file from elsewhere is read as `dit sample` reads it: a SiT, REPA or mean-flow release, which records neither
    its objective nor its heads, takes the same --objective, --time-direction, --decoupled-depth and --num-heads.
    """
    check_model_choice(model, image_size, ckpt)
    spec = objective_from_options(objective, time_direction)
    if image_size is not None and (ckpt is not None or model in (None, DEFAULT_MODEL)):
        source = f"--ckpt {ckpt}" if ckpt is not None else f"{DEFAULT_MODEL} (ImageNet-1k at every size)"
        raise UserError(f"--image-size does not change the class names of {source}", "drop --image-size")
    if ckpt is None and model in (None, DEFAULT_MODEL):
        unread = [flag for flag, value in (("--objective", objective), ("--time-direction", time_direction),
                                           ("--decoupled-depth", decoupled_depth), ("--num-heads", num_heads))
                  if value is not None]
        if unread:
            raise UserError(f"{unread[0]} describes a file, and the classes of {DEFAULT_MODEL} are ImageNet-1k's "
                            "without reading one", f"drop {unread[0]}, or pass --ckpt FILE")
        table = ClassTable.imagenet()
    else:
        path, entry = find_checkpoint(model, image_size, ckpt, offline, downloads(not json_output))
        checkpoint = read_checkpoint(path, model, None, spec or (entry and entry.objective), decoupled_depth,
                                     num_heads)
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
