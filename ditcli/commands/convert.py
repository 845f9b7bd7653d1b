"""`dit convert` (filled in by the conversion issue)."""

import typer


def convert():
    """Convert checkpoints between official, training, safetensors and diffusers formats."""
    raise typer.Exit(1)
