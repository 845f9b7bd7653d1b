"""ditcli: train, sample, evaluate and convert DiT models."""

from ditcli.version import __version__

NO_FILES = ("out", "npz", "force", "preset")  # `dit sample` options about files, which `generate` does not write


def load_model(source, device="cpu", num_heads=None, config=None, weights=None, objective=None, decoupled_depth=None,
               offline=False):
    """A DiT in eval mode from anything `dit sample --model/--ckpt` takes: a registry name ("fashion-mnist",
    "DiT-XL/2": found in the weights folders or downloaded, with its own objective), a released .pt, a training
    checkpoint or run folder (its newest), our .safetensors, a diffusers folder or a hub id org/name[@revision].
    `num_heads` is for a width outside the presets, `config` (a DiTConfig) is checked against the file, `weights`
    picks a training checkpoint's ema or model weights; see `ditcli.weights.checkpoint.load_checkpoint`."""
    from ditcli.weights.checkpoint import load_checkpoint
    from ditcli.weights.locate import find_checkpoint, model_or_ckpt

    name, ckpt = model_or_ckpt(source)
    path, entry = find_checkpoint(name, None, ckpt, offline)
    checkpoint = load_checkpoint(path, num_heads=num_heads, config=config, weights=weights,
                                 objective=objective or (entry and entry.objective), decoupled_depth=decoupled_depth)
    return checkpoint.build(device)


def generate(model="DiT-XL/2", classes=(), num_per_class=None, num=None, *, device="auto", objective=None,
             time_direction=None, **options):
    """Sample images and return them as a list of PIL images, in order: `dit sample` in one call, with its defaults
    and checks and on its sampling core, writing nothing.

        ditcli.generate("fashion-mnist", classes=[7], num_per_class=4)   # 4 sneakers, the model's own sampler

    `model` is what `load_model` takes. `classes` are ids or names (`dit classes`); without them, `num` images
    (default 16) of random classes. `options` are `dit sample`'s, by their names in
    `ditcli.sampling.request.SampleRequest`: steps, cfg, sampler, seed, batch_size, precision, guidance_channels,
    guidance_interval, eta, vae, weights, num_heads, ...; left out, each is the model's default, as in `dit sample`.
    `objective` and `time_direction` are --objective and --time-direction, for a file that does not record them.
    """
    from ditcli.diffusion.objectives import objective_from_options
    from ditcli.errors import UserError
    from ditcli.runtime import resolve_device
    from ditcli.sampling.request import SampleRequest, sample_images
    from ditcli.weights.locate import model_or_ckpt

    if any(name in options for name in NO_FILES):
        raise UserError(f"generate returns images and writes no files, so {', '.join(NO_FILES)} do not apply",
                        "save the returned images yourself, or run `dit sample`")
    name, ckpt = model_or_ckpt(model)
    request = SampleRequest(model=name, ckpt=ckpt, classes=tuple(str(c) for c in classes),
                            num_per_class=num_per_class, num=num,
                            objective=objective_from_options(objective, time_direction), **options)
    return sample_images(request, resolve_device(device))


__all__ = ["generate", "load_model", "__version__"]
