"""The forward a sampling run calls: weights cast to the run's precision, eager, compiled or an AOTInductor
package, and whether compiling pays for this job on this machine.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import torch

from ditcli.downloads import home_dir
from ditcli.model.dit import DiTConfig, forward_macs
from ditcli.runtime import resolve_precision
from ditcli.sampling.aot import AotCompiled
from ditcli.sampling.block_cache import ROW_QUANTUM
from ditcli.sampling.config import GenerateConfig


class CastWeights(torch.nn.Module):
    """A DiT run from weights cast once to bf16 or fp16, with no per-forward autocast.

    Its input is cast on the way in and its output returned in float32, so the sampler's state and the guidance
    arithmetic stay fp32; the timestep features are computed in fp32 inside the embedder, before its first linear.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = model if weights_dtype(model) == dtype else cast_copy(model, dtype)
        self.config, self.dtype = model.config, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """`r`: a mean-flow model's second time, passed on only where given."""
        x = x.to(self.dtype)
        return (self.inner(x, t, y) if r is None else self.inner(x, t, y, r=r)).float()


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` whose floating-point tensors are cast to `dtype`, made without first copying them in their
    own dtype (what `deepcopy(model).to(dtype)` does: 1.4 s of an fp32 DiT-B/2's start-up on a CPU, against 0.4 s)."""
    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach().clone()

    memo = {id(p): torch.nn.Parameter(cast(p), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): cast(b) for b in model.buffers()})
    return copy.deepcopy(model, memo)


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def inference_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model a run of `precision` calls: itself in fp32, else a `CastWeights` copy (made once per run)."""
    dtype = resolve_precision(precision)
    if dtype == torch.float32 or (isinstance(model, CastWeights) and model.dtype == dtype):
        return model
    return CastWeights(model, dtype)


# `--compile auto`: compile when the eager forwards of the job are long enough to repay the compilation. The figures
# are measured on 2-core CPUs at 2 threads (docs/benchmarks.md): building the AOTInductor package of a DiT forward took
# 45 s for the embedded model and 42 s for DiT-B/2, and loading a package an earlier run built about 4 s (2 s of them
# torch's probe of the CPU's vector ISA). Eager forwards ran at about 200 GMAC/s in bf16 and 85 in fp32 on a Xeon with
# AMX, where freezing saved a third of a bf16 forward (DiT-B/2, batch 4: 442 -> 294 ms); on an AMD EPYC with AVX-512
# BF16 and no AMX at about 120 and 55, where freezing saved 13% (B/2 and XL/2 alike). GPUs are credited 100x the AMX
# rates, the AMX saving and 60 s of compilation (torch.compile has no package to load).
COMPILE_SECONDS = {"cpu": 45.0, "cuda": 60.0}
LOAD_SECONDS = {"cpu": 4.0}
EAGER_MACS_PER_S = {"amx": {"bf16": 200e9, "fp16": 200e9, "fp32": 85e9},
                    "other": {"bf16": 120e9, "fp16": 120e9, "fp32": 55e9}}
COMPILE_SAVING = {"amx": 1 / 3, "other": 0.13}
GPU_SPEEDUP = 100.0


@functools.cache
def cpu_kind() -> str:
    """"amx" on a CPU with AMX tiles for bf16, else "other" (the rates above); from /proc/cpuinfo where there is one."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "other"
    return "amx" if "amx_bf16" in flags else "other"


def compile_pays(config: GenerateConfig, model_config: DiTConfig, nfe: int | None, device: torch.device,
                 built: bool = False) -> tuple[bool, str]:
    """Whether `--compile auto` compiles this job, and why, from the job's forward MACs at the measured rates.
    `built`: an earlier run left the package, so compiling costs only its loading (CPU)."""
    passes = 2 if config.guidance.scale not in (0.0, 1.0) else 1  # a guided step runs the doubled batch
    rows = -(-config.num_images // batch_width(config)) * batch_width(config) * passes
    macs = forward_macs(model_config) * rows * (nfe or config.steps)
    kind = "amx" if device.type == "cuda" else cpu_kind()
    rate = EAGER_MACS_PER_S[kind].get(config.precision, EAGER_MACS_PER_S[kind]["fp32"])
    rate *= GPU_SPEEDUP if device.type == "cuda" else 1.0
    eager = macs / rate
    loads = built and device.type in LOAD_SECONDS
    cost = LOAD_SECONDS[device.type] if loads else COMPILE_SECONDS.get(device.type, COMPILE_SECONDS["cuda"])
    saved = eager * COMPILE_SAVING[kind]
    verdict = saved > cost
    paying = "loading the package an earlier run built" if loads else "compilation"
    if not loads and device.type in LOAD_SECONDS:
        paying += f" (or {LOAD_SECONDS[device.type]:.0f} s to load a package an earlier run built)"
    return verdict, (f"{'compiled' if verdict else 'eager'}: the job's forwards take about {eager:.0f} s eager, "
                     f"compiling would save about {saved:.0f} s for about {cost:.0f} s of {paying}")


def compiled(model: torch.nn.Module, autotune: bool = False) -> torch.nn.Module:
    """torch.compile for sampling: inductor freezing folds the (inference-only) weights into the graph; compiled
    artifacts are cached in the user cache folder (TORCHINDUCTOR_CACHE_DIR, unless set), so a rerun pays less.
    `autotune` adds what mode="max-autotune" turns on, kernel autotuning and CUDA graphs (GPU benchmarks only: its
    compile time is not yet measured, so `dit sample` does not use it)."""
    inductor_cache_in_home()
    tuning = {"max_autotune": True, "triton.cudagraphs": True} if autotune else {}
    return torch.compile(model, options={"freezing": True, **tuning})


def compiled_for(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The compiled forward of a sampling run: on a CPU an AOTInductor package kept in the home directory across
    runs (`ditcli.sampling.aot`: built once, then loaded in seconds), elsewhere `compiled`."""
    if device.type == "cpu":
        inductor_cache_in_home()
        return AotCompiled(model, home_dir() / "aoti")
    return compiled(model)


def inductor_cache_in_home() -> None:
    """Inductor's caches go to the home directory (TORCHINDUCTOR_CACHE_DIR, unless the user set it)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its own default into the variable the first time it looks, so that value counts as unset.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(home_dir() / "inductor")


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper or an AOTInductor package."""
    return model.model if isinstance(model, AotCompiled) else getattr(model, "_orig_mod", model)


def batch_width(config: GenerateConfig) -> int:
    """Images per forward pass: the batch size (at most the run's size) rounded up to a multiple of ROW_QUANTUM.

    Matmul kernels (MKL/oneDNN on CPU, cuBLAS on GPU) may pick another code path, and round differently, for a row
    count that is not a multiple of 4. Every forward of a run has this one width, whatever the rank or the position
    of the batch, so image i comes out bit-identical for any batch size, order or number of processes.
    """
    return -(-min(config.batch_size, config.num_images) // ROW_QUANTUM) * ROW_QUANTUM
