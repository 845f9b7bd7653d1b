"""`dit sample` and `dit classes` (filled in by the sampling issue)."""

import typer


def sample():
    """Generate class-conditional images from a DiT checkpoint."""
    raise typer.Exit(1)


def classes():
    """Print the class names of ImageNet-1k or of a checkpoint."""
    raise typer.Exit(1)
