"""`dit convert` and `dit convert --info`: read any supported weights, write safetensors or a DiTPipeline folder, and
measure how closely the result reproduces the source (parity numbers, returned as data; nothing here prints).

The diffusers key map and folder format live in ditcli.weights.diffusers_format; this module only drives them.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ditcli.diffusion.ddpm import TRAIN_TIMESTEPS
from ditcli.diffusion.guidance import GUIDED_CHANNELS, MAX_CFG
from ditcli.diffusion.objectives import Objective
from ditcli.diffusion.samplers import (
    MAX_STEPS,
    SamplingDefaults,
    check_sampler_settings,
)
from ditcli.errors import UserError
from ditcli.model.dit import DiT, DiTConfig
from ditcli.runtime import PRECISIONS
from ditcli.weights.checkpoint import (
    load_checkpoint,
    newest_run_checkpoint,
    save_safetensors,
)
from ditcli.weights.diffusers_format import (
    is_rounded_table,
    read_diffusers,
    to_diffusers,
)
from ditcli.weights.fields import SAMPLER_NAMES, check_defaults_fit
from ditcli.weights.record import Checkpoint, describe, form_name

OUTPUT_FORMATS = ("safetensors", "diffusers")

DRIFT_CAUSES = (
    "diffusers' timestep features use frequencies exp(-ln(10000) i / 127), the reference exp(-ln(10000) i / 128) "
    "(Timesteps(downscale_freq_shift=1) in CombinedTimestepLabelEmbeddings)",
    "diffusers' pre-MLP LayerNorm uses config.norm_eps (default 1e-5, the hub's DiT folders); the reference uses "
    "1e-6, which our exports write",
)
RECORD_HINT = "record others with --sampler, --steps, --cfg, --guidance-interval or --guidance-channels"
PIXEL_PIPELINE_WARNING = ("a pixel-space model: DiTPipeline cannot sample this folder (it always decodes through a "
                          "VAE); load transformer/ with DiTTransformer2DModel, or sample it with `dit sample --ckpt`")


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


@dataclass(frozen=True)
class SamplingChoice:
    """The sampling defaults `dit convert` records in a .safetensors output, over the source's own record: a field
    left None keeps the source's value. `interval` replaces the source's only with `set_interval` (None: guide every
    step)."""

    sampler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    interval: tuple[float, float] | None = None
    set_interval: bool = False
    channels: str | None = None

    def given(self) -> list[str]:
        """The options given, as their flags."""
        given = {"--sampler": self.sampler is not None, "--steps": self.steps is not None,
                 "--cfg": self.cfg is not None, "--guidance-interval": self.set_interval,
                 "--guidance-channels": self.channels is not None}
        return [flag for flag, is_given in given.items() if is_given]

    def check(self) -> None:
        """Each value on its own, before any file is read."""
        if self.sampler is not None and self.sampler not in SAMPLER_NAMES:
            raise UserError(f"unknown --sampler {self.sampler!r}", f"choose from {', '.join(SAMPLER_NAMES)}")
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise UserError(f"--steps must be >= 1 and <= {MAX_STEPS:,}, got {self.steps:,}",
                            "pass the number of sampling steps to record, as dit sample --steps takes it")
        if self.cfg is not None and not (math.isfinite(self.cfg) and 0 <= self.cfg <= MAX_CFG):
            raise UserError(f"--cfg {self.cfg:g} is out of range",
                            f"pass a scale in [0, {MAX_CFG:g}]: 1 disables guidance, 0 is unconditional")
        if self.channels is not None and self.channels not in GUIDED_CHANNELS:
            raise UserError(f"unknown --guidance-channels {self.channels!r}", f"choose {' or '.join(GUIDED_CHANNELS)}")
        low, high = self.interval or (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
            raise UserError(f"--guidance-interval {low:g},{high:g} is not an interval",
                            "pass LOW,HIGH with 0 <= LOW <= HIGH, for example --guidance-interval 0,700")

    def record(self, checkpoint: Checkpoint, source) -> SamplingDefaults | None:
        """The defaults to record: the source's (where it records none, the ones `dit sample` gives it) with the
        options given on top, each checked against the model; then the whole record as `dit sample` would check it,
        sampler plan included, so that no file is written with defaults it refuses."""
        defaults = checkpoint.sampling
        if self.given():
            self.check_fit(checkpoint, source)
            changes = {key: value for key, value in (("sampler", self.sampler), ("steps", self.steps),
                                                     ("cfg", self.cfg), ("channels", self.channels))
                       if value is not None}
            if self.set_interval:
                changes["interval"] = self.interval
            defaults = replace(defaults or checkpoint.objective.default_sampling, **changes)
            if self.steps is not None:  # dopri5 chooses its own steps: a recorded --steps would never be used
                check_sampler_settings(defaults.sampler, {"steps": "--steps"})
            if self.set_interval and self.interval is not None and defaults.cfg == 1:  # as dit sample refuses it
                raise UserError("--guidance-interval only applies to a guided run, and the recorded cfg is 1",
                                "drop --guidance-interval, or record a --cfg other than 1")
        check_defaults_fit(defaults, checkpoint.objective, checkpoint.config, checkpoint.schedule,
                           "dit convert would record", RECORD_HINT, plan=True)
        return defaults

    def check_fit(self, checkpoint: Checkpoint, source) -> None:
        """The sampler and the interval against the model's objective, the scale against its null class."""
        objective, config = checkpoint.objective, checkpoint.config
        if self.sampler is not None and self.sampler not in objective.samplers:
            raise UserError(f"--sampler {self.sampler} does not sample {source}, {objective.noun()}",
                            f"choose from {', '.join(objective.samplers)}")
        objective.check_interval(self.interval, f", and {source} is {objective.noun()}")
        if self.cfg not in (None, 1.0) and config.num_classes > 0 and config.class_dropout_prob == 0:
            raise UserError(f"--cfg {self.cfg:g} needs a null class, but {source} was trained without label dropout",
                            "record --cfg 1")


def convert(source: str | Path, destination: str | Path, to: str | None = None, dtype: str = "fp32",
            weights: str | None = None, num_heads: int | None = None, vae: str | None = "auto",
            force: bool = False, diffusers_check: bool = True, objective: Objective | None = None,
            sampling: SamplingChoice = SamplingChoice(), decoupled_depth: int | None = None) -> ConversionReport:
    """Read any supported weights, write safetensors or a DiTPipeline folder, and measure parity.

    `vae="auto"` includes the VAE the checkpoint's codec names (from the Hugging Face cache or the hub); None leaves
    it out. `diffusers_check` also runs diffusers' own model on the result to measure its documented drift.
    `num_heads` is the user's --num-heads: a file that records other heads is refused. `sampling` sets the sampling
    defaults a .safetensors output records. `decoupled_depth` is a DMF file's K, which it does not record. DST may
    be SRC itself (with `force`): it is rewritten atomically.
    """
    destination = Path(destination)
    to = check_request(source, destination, to, dtype, force, sampling)
    source = newest_run_checkpoint(Path(source)) or source  # a `dit train` run folder: its newest checkpoint
    checkpoint = load_checkpoint(source, num_heads=num_heads, weights=weights, objective=objective, heads_given=True,
                                 decoupled_depth=decoupled_depth)
    checkpoint.objective.check_export(to, source)
    check_pipeline_codec(checkpoint, to, vae, source)
    checkpoint.sampling = sampling.record(checkpoint, source)
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
        warnings += [PIXEL_PIPELINE_WARNING] if (checkpoint.codec or {}).get("kind") == "pixel" else []
        result = read_diffusers(destination)
        parity = {"roundtrip": _roundtrip(checkpoint, result, torch_dtype, source_model)}
        if diffusers_check:
            parity["diffusers"] = diffusers_parity(source_model, destination / "transformer")
    return ConversionReport(str(source), checkpoint.format, str(destination), to, describe(checkpoint.config),
                            checkpoint.config.to_dict(), dtype, checkpoint.weights, parity, warnings)


def check_pipeline_codec(checkpoint: Checkpoint, to: str, vae: str | None, source) -> None:
    """A pixel-space model does not run in diffusers' DiTPipeline, which always decodes its samples through a VAE
    (`vae.decode(latents / vae.config.scaling_factor)`): without one it fails at decode, and no AutoencoderKL gives
    pixels back unchanged. So its export is refused unless `vae` is None (`--vae none`): the transformer alone, which
    `DiTTransformer2DModel` and `dit` read, with a warning that the pipeline cannot sample it."""
    if to != "diffusers" or (checkpoint.codec or {}).get("kind") != "pixel" or vae is None:
        return
    if vae != "auto":
        raise UserError(f"--vae {vae} does not apply: {source} is a pixel-space model, and a VAE would decode its "
                        "pixels as latents", "drop --vae; see `dit convert --help` for what works")
    raise UserError(f"{source} is a pixel-space model, and diffusers' DiTPipeline always decodes its samples "
                    "through a VAE, so it cannot sample one", "convert to a .safetensors file for `dit sample`, or "
                    "pass --vae none to write the transformer alone, which DiTTransformer2DModel loads")


def check_request(source: str | Path, destination: Path, to: str | None, dtype: str, force: bool,
                  sampling: SamplingChoice) -> str:
    """The output format, once the options are checked, before any file is read."""
    to = to or _format_from_name(destination)
    if to not in OUTPUT_FORMATS:
        raise UserError(f"unknown output format {to!r}", f"choose from {', '.join(OUTPUT_FORMATS)}")
    if dtype not in PRECISIONS:
        raise UserError(f"unknown --dtype {dtype!r}", f"choose from {', '.join(PRECISIONS)}")
    if destination.exists() and not force:
        itself = Path(source).exists() and os.path.samefile(source, destination)
        raise UserError(f"{destination} already exists{' (it is SRC itself)' if itself else ''}",
                        "pass --force to rewrite it in place" if itself else "pass --force to overwrite it")
    given = sampling.given()
    if given and to != "safetensors":
        verb, them = ("sets", "it") if len(given) == 1 else ("set", "them")
        raise UserError(f"{', '.join(given)} {verb} the sampling defaults of a .safetensors output, and --to {to} "
                        "writes a folder", f"drop {them}, or convert to a .safetensors file")
    sampling.check()
    return to


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
         objective: Objective | None = None, decoupled_depth: int | None = None) -> dict:
    """What a weight file or folder is: format, config, parameter count, dtype, EMA or not, classes, codec,
    objective, a mean-flow model's form, and the keys it holds that the model does not use."""
    checkpoint = load_checkpoint(path, num_heads=num_heads, weights=weights, objective=objective, heads_given=True,
                                 decoupled_depth=decoupled_depth)
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
            "form": form_name(checkpoint.config),
            "dropped": list(checkpoint.dropped),
            "sampling": checkpoint.sampling.to_dict() if checkpoint.sampling else None,
            "ema_record": checkpoint.ema.to_dict() if checkpoint.ema else None,
            "warnings": list(checkpoint.warnings)}
