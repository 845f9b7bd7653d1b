"""`dit convert` and `dit convert --info`: read any supported weights, write safetensors or a DiTPipeline folder, and
measure how closely the result reproduces the source (parity numbers, returned as data; nothing here prints).

The diffusers key map and folder format live in ditcli.diffusers_format; this module only drives them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ditcli.checkpoint import load_checkpoint, save_safetensors
from ditcli.diffusers_format import is_rounded_table, read_diffusers, to_diffusers
from ditcli.diffusion import TRAIN_TIMESTEPS
from ditcli.objectives import ObjectiveSpec
from ditcli.errors import UserError
from ditcli.model import DiT, DiTConfig
from ditcli.runtime import PRECISIONS
from ditcli.state import Checkpoint, describe

OUTPUT_FORMATS = ("safetensors", "diffusers")

DRIFT_CAUSES = (
    "diffusers' timestep features use frequencies exp(-ln(10000) i / 127), the reference exp(-ln(10000) i / 128) "
    "(Timesteps(downscale_freq_shift=1) in CombinedTimestepLabelEmbeddings)",
    "diffusers' pre-MLP LayerNorm uses config.norm_eps (default 1e-5, the hub's DiT folders); the reference uses "
    "1e-6, which our exports write",
)


# Parity and the `dit convert` entry point.

def parity_inputs(config: DiTConfig, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Fixed-seed (x, t, y) for comparing two models; the last label is the null class when the model has one."""
    generator = torch.Generator().manual_seed(seed)
    size = (batch, config.in_channels, config.input_size, config.input_size)
    x = torch.randn(size, generator=generator)  # (N, C, H, W)
    t = torch.randint(0, TRAIN_TIMESTEPS, (batch,), generator=generator)
    y = torch.randint(0, max(config.num_classes, 1), (batch,), generator=generator)
    if config.label_rows > config.num_classes:
        y[-1] = config.num_classes
    return x, t, y


@torch.no_grad()
def max_abs_diff(source, result, config: DiTConfig) -> dict:
    """Max |source - result| of one fixed-seed forward in fp32, and the size of the source output."""
    x, t, y = parity_inputs(config)
    a = source(x, t, y)
    b = result(x, t, y)
    b = b.sample if hasattr(b, "sample") else b
    return {"max_abs_diff": (a.double() - b.double()).abs().max().item(), "max_abs_output": a.abs().max().item()}


def diffusers_parity(source: DiT, transformer_dir: Path) -> dict:
    """The source against diffusers' own DiTTransformer2DModel from `transformer_dir`; reference models drift."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(str(transformer_dir), local_files_only=True, low_cpu_mem_usage=False,
                                                  torch_dtype=torch.float32).eval()
    report = max_abs_diff(source, model, source.config)
    reference = source.config.timestep_convention == "reference"
    return {**report, "expected": reference, "norm_eps": model.config.norm_eps,
            "causes": list(DRIFT_CAUSES) if reference else []}


@dataclass
class ConversionReport:
    """What `convert` wrote and how closely the result reproduces the source."""

    source: str
    source_format: str
    destination: str
    to: str
    model: str
    config: dict
    dtype: str
    weights: str
    parity: dict
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def convert(source: str | Path, destination: str | Path, to: str | None = None, dtype: str = "fp32",
            weights: str | None = None, num_heads: int | None = None, vae: str | None = "auto",
            force: bool = False, diffusers_check: bool = True,
            objective: ObjectiveSpec | None = None) -> ConversionReport:
    """Read any supported weights, write safetensors or a DiTPipeline folder, and measure parity.

    `vae="auto"` includes the VAE the checkpoint's codec names (from the Hugging Face cache or the hub); None leaves
    it out. `diffusers_check` also runs diffusers' own model on the result to measure its documented drift.
    """
    destination = Path(destination)
    to = to or _format_from_name(destination)
    if to not in OUTPUT_FORMATS:
        raise UserError(f"unknown output format {to!r}", f"choose from {', '.join(OUTPUT_FORMATS)}")
    if dtype not in PRECISIONS:
        raise UserError(f"unknown --dtype {dtype!r}", f"choose from {', '.join(PRECISIONS)}")
    if destination.exists() and not force:
        raise UserError(f"{destination} already exists", "pass --force to overwrite it")
    checkpoint = load_checkpoint(source, num_heads=num_heads, weights=weights, objective=objective)
    if to == "diffusers" and checkpoint.objective.objective == "flow":
        raise UserError(f"{source} is a flow-matching model ({checkpoint.objective.describe()}), and a DiTPipeline "
                        "folder would sample it as a DDPM eps model (its scheduler and timesteps are DDPM's)",
                        "convert it to .safetensors, which records the objective")
    warnings = list(checkpoint.warnings)
    warnings += [f"dropped {group}" for group in checkpoint.dropped]
    torch_dtype = PRECISIONS[dtype]
    source_model = checkpoint.build()

    # Write, then read the result back the way any later command would.
    if to == "safetensors":
        save_safetensors(checkpoint, destination, dtype=torch_dtype, force=force)
        result = load_checkpoint(destination)
        parity = {"roundtrip": _roundtrip(checkpoint, result, torch_dtype, source_model)}
    else:
        codec_vae = (checkpoint.codec or {}).get("vae") if (checkpoint.codec or {}).get("kind") == "vae" else None
        warnings += to_diffusers(checkpoint, destination, torch_dtype, codec_vae if vae == "auto" else vae, force)
        result = read_diffusers(destination)
        parity = {"roundtrip": _roundtrip(checkpoint, result, torch_dtype, source_model)}
        if diffusers_check:
            parity["diffusers"] = diffusers_parity(source_model, destination / "transformer")
    return ConversionReport(str(source), checkpoint.format, str(destination), to, describe(checkpoint.config),
                            checkpoint.config.to_dict(), dtype, checkpoint.weights, parity, warnings)


def _roundtrip(source: Checkpoint, result: Checkpoint, dtype: torch.dtype, source_model: DiT) -> dict:
    """Whether the written weights read back equal to the source's (cast to `dtype`), and the forward difference.

    `expected_differences` lists tensors that differ only as they must: a pos_embed the source stored rounded (an fp16
    file) and the result recomputes from the sin-cos formula (diffusers stores none).
    """
    differing = sorted(k for k, v in source.state_dict.items() if k not in result.state_dict or not torch.equal(
        v.to(dtype) if v.is_floating_point() else v, result.state_dict[k]))
    identical = set(source.state_dict) == set(result.state_dict) and not differing
    config = source.config
    expected = [k for k in differing if k == "pos_embed" and k in result.state_dict
                and is_rounded_table(source.state_dict[k], config) and is_rounded_table(result.state_dict[k], config)]
    return {"identical_weights": identical, "differing": differing, "expected_differences": expected,
            **max_abs_diff(source_model, result.build(), config)}


def _format_from_name(path: Path) -> str:
    if path.suffix == ".safetensors":
        return "safetensors"
    raise UserError(f"cannot tell the output format from the name {path}",
                    "name it *.safetensors, or pass --to safetensors or --to diffusers")


def info(path: str | Path, num_heads: int | None = None, weights: str | None = None,
         objective: ObjectiveSpec | None = None) -> dict:
    """What a weight file or folder is: format, config, parameter count, dtype, EMA or not, classes, codec,
    objective, and the keys it holds that the model does not use."""
    checkpoint = load_checkpoint(path, num_heads=num_heads, weights=weights, objective=objective)
    state = checkpoint.state_dict
    recorded = checkpoint.weights_recorded
    return {"path": str(path), "format": checkpoint.format, "model": describe(checkpoint.config),
            "config": checkpoint.config.to_dict(),
            "parameters": sum(v.numel() for v in state.values()),
            "dtype": sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}),
            "weights": checkpoint.weights if recorded else "unknown",
            "ema": checkpoint.weights == "ema" if recorded else None,
            "class_names": len(checkpoint.class_names) if checkpoint.class_names is not None else None,
            "codec": checkpoint.codec, "timestep_convention": checkpoint.config.timestep_convention,
            "convention_source": checkpoint.convention_source, "schedule": checkpoint.schedule,
            "objective": checkpoint.objective.to_metadata(),
            "objective_source": "recorded in the file" if checkpoint.objective_recorded else "given or assumed",
            "dropped": list(checkpoint.dropped),
            "sampling": checkpoint.sampling.to_dict() if checkpoint.sampling else None,
            "ema_record": checkpoint.ema.to_dict() if checkpoint.ema else None,
            "warnings": list(checkpoint.warnings)}
