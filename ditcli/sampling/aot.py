"""Ahead-of-time compilation for CPU sampling: a DiT forward compiled once by AOTInductor, kept across runs.

`torch.compile` recompiles in every process; with inductor freezing its FX graph cache does not help either, so a
second `dit sample --compile` paid most of the first one's compile again (60 s, then 17 s, on the embedded model).
A package holds the frozen, compiled forward for one set of weights, one dtype and any batch size. It lives in the
home directory under a key of everything that decides its code: the weights' bytes, the input signature, torch,
ditcli and the CPU's instruction set. The first run builds it (tens of seconds); later runs load it in a few
seconds. Its inputs are always (x float32, t float32, y int64), and a mean-flow model's second time r float32, whatever
dtypes the sampler hands over (the timestep features are computed in float32 anyway), so `package_exists` can tell
before a run whether a package is ready.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import weakref
from pathlib import Path

import torch
from torch import nn

from ditcli.errors import UserError
from ditcli.version import __version__

# The largest batch a package accepts: rows of one forward, a guided batch counted twice.
MAX_ROWS = 1 << 16


# Digests of sampling models, whose weights do not change, so that deciding and compiling hash them once.
_DIGESTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def weights_digest(model: nn.Module) -> str:
    """sha256 of a module's state: every key, dtype, shape and byte (0.3 s for a bf16 DiT-B/2 on a CPU), remembered
    for the module's lifetime."""
    if model not in _DIGESTS:
        digest = hashlib.sha256()
        for key, tensor in model.state_dict().items():
            digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        _DIGESTS[model] = digest.hexdigest()
    return _DIGESTS[model]


def package_key(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    """What decides a package's code; the batch dimension is left out, since a package takes any batch."""
    signature = {"weights": weights_digest(model), "inputs": [(list(a.shape[1:]), str(a.dtype)) for a in inputs],
                 "torch": torch.__version__, "ditcli": __version__, "machine": platform.machine(),
                 "isa": torch.backends.cpu.get_cpu_capability()}
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:24]


def standard_inputs(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                    r: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The dtypes every package takes: float32 images and times (integer timesteps are exact in float32), int64
    labels, and a mean-flow model's float32 second time r as a fourth input."""
    inputs = (x.float(), t.float(), y.long())
    return inputs if r is None else (*inputs, r.float())


def split_inputs(inputs: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(x, t, y) by position and r by name: a DiT's fourth positional argument is the training-only drop mask."""
    return inputs[:3], dict(zip(("r",), inputs[3:]))


def package_path(folder: Path, model: nn.Module) -> Path:
    """Where the package of `model` (a DiT or its `CastWeights` copy) lives in `folder`."""
    config = model.config
    x, time = torch.zeros(1, config.in_channels, config.input_size, config.input_size), torch.zeros(1)
    second = time if config.mean_flow_form is not None else None
    inputs = standard_inputs(x, time, torch.zeros(1, dtype=torch.long), second)
    return Path(folder) / f"{package_key(model, inputs)}.pt2"


def package_exists(folder: Path, model: nn.Module) -> bool:
    """Whether a run of `model` would load its package rather than build it (a damaged one still counts)."""
    return package_path(folder, model).exists()


class AotCompiled(nn.Module):
    """A DiT (or its `CastWeights` copy) run through an AOTInductor package, built at its first call if the home
    directory holds none for it. `built` says whether this process compiled the package (False: it was loaded)."""

    def __init__(self, model: nn.Module, folder: Path):
        super().__init__()
        self.model, self.config, self.folder = model, model.config, Path(folder)
        self.runner = None
        self.built: bool | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        inputs = standard_inputs(x, t, y, r)
        if self.runner is None:
            self.runner = self.load_or_build(inputs)
        args, kwargs = split_inputs(inputs)
        return self.runner(*args, **kwargs)

    def load_or_build(self, inputs: tuple[torch.Tensor, ...]):
        """Load the package for these weights; build it when there is none, or when the one there cannot be loaded
        (damaged on disk), in which case the new one replaces it."""
        path = package_path(self.folder, self.model)
        if path.exists():
            try:
                runner = torch._inductor.aoti_load_package(str(path))
                self.built = False
                return runner
            except Exception:  # noqa: BLE001  whatever the loader raises, a fresh build is the cure
                pass
        build_package(self.model, inputs, path)
        self.built = True
        return torch._inductor.aoti_load_package(str(path))


def build_package(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    """Export `model` with a dynamic batch, compile it with freezing and move the package into place atomically,
    so that two processes building the same package never leave half of one."""
    batch = torch.export.Dim("batch", min=1, max=MAX_ROWS)
    args, kwargs = split_inputs(inputs)
    dynamic = {"x": {0: batch}, "t": {0: batch}, "y": {0: batch}, **{name: {0: batch} for name in kwargs}}
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.pt2")  # AOTInductor wants the .pt2 suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs={"freezing": True})
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write the compiled package {path}: {exc.strerror or type(exc).__name__}",
                        "set DIT_HOME to a writable folder with space, or drop --compile") from None
    finally:
        if tmp.exists():  # False, not an error, where the folder itself could not be made
            tmp.unlink()
