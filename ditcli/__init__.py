"""ditcli: train, sample, evaluate and convert DiT models."""

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load a DiT from a released .pt, a training checkpoint or our .safetensors; see `ditcli.checkpoint.load_model`."""
    from ditcli.checkpoint import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["load_model", "__version__"]
