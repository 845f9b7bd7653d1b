"""Devices, precisions and backend flags, resolved in the command that needs them (never at import)."""

from __future__ import annotations

import contextlib
import re

import torch

from ditcli.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_NAME = re.compile(r"(?P<base>[a-z]+)(?::(?P<index>[0-9]+))?")  # cuda, cuda:1; torch refuses anything else
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """"auto" picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    match = DEVICE_NAME.fullmatch(name)
    base = match["base"] if match else None
    if base not in DEVICES or base == "auto":
        raise UserError(f"unknown device {name!r}", f"choose from {', '.join(DEVICES)}, or cuda:N for GPU N")
    if base == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    if base == "cuda" and match["index"] is not None and int(match["index"]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: no such GPU, {torch.cuda.device_count()} are visible",
                        f"pass cuda:0 to cuda:{torch.cuda.device_count() - 1}, or cuda")
    if base == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available", "use --device cpu or auto")
    return torch.device(name)


def resolve_precision(name: str) -> torch.dtype:
    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}", f"choose from {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision autocast for bf16/fp16; a no-op context for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_backend_flags(deterministic: bool = False, allow_tf32: bool = True, autotune: bool = True) -> None:
    """The one place backend flags are set: TF32 matmuls and cuDNN autotuning for speed, or a deterministic mode (no
    TF32, deterministic algorithms, no autotuning). Each command calls it once, never at import time."""
    tf32 = allow_tf32 and not deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = autotune and not deterministic
    if deterministic or torch.are_deterministic_algorithms_enabled():
        # The call imports torch's compiler config (1-2 s of start-up on a CPU), so it is made only when it changes
        # something.
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
