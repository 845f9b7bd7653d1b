"""ditcli: train, sample, evaluate and convert DiT models."""

from ditcli.version import __version__


def load_model(*args, **kwargs):
    """Load a DiT from a released .pt, a training checkpoint or our .safetensors; see `ditcli.weights.checkpoint.load_model`."""
    from ditcli.weights.checkpoint import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["load_model", "__version__"]
