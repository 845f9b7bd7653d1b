"""`dit classes`: the class names of ImageNet-1k or of a checkpoint, searchable, as a table or JSON."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ditcli.cli.options import (
    CheckpointOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelOpt,
    OfflineOpt,
)
from ditcli.cli.progress import downloads
from ditcli.data.classes import ClassTable, class_table
from ditcli.errors import UserError
from ditcli.weights.checkpoint import load_checkpoint
from ditcli.weights.locate import (
    DEFAULT_MODEL,
    check_model_choice,
    find_checkpoint,
    preset_heads,
)

SearchOpt = Annotated[str | None, typer.Option("--search", help="Show only classes whose id or names contain TEXT.")]


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
        path, _ = find_checkpoint(model, image_size, ckpt, offline, downloads(not json_output))
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
