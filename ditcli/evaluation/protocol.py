"""The published FID protocol of DiT (Peebles & Xie, Table 4): as a sampling preset, and as a check on samples.

`dit sample --preset paper-fid` expands `PAPER_FID` into sampling options; `dit fid` reads the provenance that
`dit sample` writes beside its samples and names every setting that differs from the protocol. Nothing here prints.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ditcli.data.classes import IMAGENET_CLASSES
from ditcli.diffusion.guidance import PAPER_CHANNELS
from ditcli.errors import UserError
from ditcli.hub import repo_of
from ditcli.model.codec import LATENT_CHANNELS, VAE_ALIASES


@dataclass(frozen=True)
class SamplingProtocol:
    """How the samples behind a published FID were drawn (DiT's `sample_ddp.py` with its evaluation settings)."""

    sampler: str = "ddpm"
    steps: int = 250
    cfg: float = 1.5
    guidance_channels: str = PAPER_CHANNELS
    vae: str = "ema"
    precision: str = "fp32"
    num_images: int = 50_000

    def describe(self) -> str:
        return (f"{self.steps} {self.sampler.upper()} steps, cfg {self.cfg:g} on the {self.guidance_channels} guidance "
                f"channels, {self.vae} VAE, {self.precision}, {self.num_images:,} images with uniformly random classes")


PAPER_FID = SamplingProtocol()
SAMPLE_PRESETS = {"paper-fid": PAPER_FID}
# Published DiT-XL/2 numbers under PAPER_FID, by the resolution of ADM's ImageNet reference batch.
PAPER_RESULTS = {256: "DiT-XL/2 at 256x256: FID 2.27", 512: "DiT-XL/2 at 512x512: FID 3.04"}


# The preset.

def expand_preset(name: str, given: dict) -> tuple[dict, list[str]]:
    """The preset's settings, with every option given explicitly (not None) on top, and one note per override.

    `given` holds sampler, steps, cfg, guidance_channels, vae, precision, num and num_per_class as the user gave them.
    """
    if name not in SAMPLE_PRESETS:
        raise UserError(f"unknown --preset {name!r}", f"choose from {', '.join(SAMPLE_PRESETS)}")
    protocol = SAMPLE_PRESETS[name]
    settings = {**asdict(protocol), "num": protocol.num_images}
    del settings["num_images"]
    notes = []
    for key, value in given.items():
        if value is None or key == "num_per_class":
            continue
        if value != settings[key]:
            notes.append(f"--{_flag(key)} {_show(value)} overrides the preset's {_show(settings[key])}")
        settings[key] = value
    if given.get("num_per_class") is not None:
        notes.append(f"--num-per-class {given['num_per_class']} replaces the preset's {settings['num']:,} "
                     "random-class images")
        settings["num"] = None
    return settings, notes


def _flag(key: str) -> str:
    return {"num": "num-images"}.get(key, key.replace("_", "-"))


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


# The check.

def read_provenance(samples: Path) -> dict | None:
    """The record `dit sample` left beside `samples`: FILE.provenance.json for an .npz, provenance.json in a folder."""
    path = samples / "provenance.json" if samples.is_dir() else samples.with_name(samples.stem + ".provenance.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "sampler" in data else None


def protocol_of(provenance: dict) -> dict:
    """The sampling settings a provenance record states, in PAPER_FID's terms."""
    codec = provenance.get("codec") or {}
    return {"sampler": provenance.get("sampler"), "steps": provenance.get("steps"), "cfg": provenance.get("cfg"),
            "guidance_channels": provenance.get("guidance_channels"),
            "guidance_interval": provenance.get("guidance_interval"),
            "vae": vae_alias(codec.get("vae")) if codec.get("kind") == "vae" else codec.get("kind"),
            "precision": provenance.get("precision"), "num_images": provenance.get("num_images"),
            "model": provenance.get("model"), "preset": provenance.get("preset")}


def vae_alias(vae: str | None) -> str | None:
    """"ema" or "mse" for the SD VAEs, by hub id or by a path inside the hub cache; else the name as recorded."""
    for alias, repo in VAE_ALIASES.items():
        if vae == repo or (vae is not None and repo_of(vae) == repo):
            return alias
    return vae


def paper_result(ref_name: str, resolution: int | None, provenance: dict) -> str | None:
    """The published result the samples are compared against: ADM's ImageNet reference batches at 256 or 512,
    or samples of a 1000-class latent DiT; None when no published protocol applies (Fashion-MNIST, own data)."""
    config = provenance.get("model_config") or {}
    imagenet = "imagenet" in ref_name.lower() or (config.get("num_classes") == IMAGENET_CLASSES
                                                  and config.get("in_channels") == LATENT_CHANNELS)
    return PAPER_RESULTS.get(resolution) if imagenet else None


def deviations(settings: dict, num_samples: int, protocol: SamplingProtocol = PAPER_FID) -> list[str]:
    """One line per setting that differs from `protocol`."""
    found = []
    if settings["cfg"] != protocol.cfg:
        found.append(f"cfg {_show(settings['cfg'])} is not the paper's {protocol.cfg:g}")
    if settings["guidance_channels"] != protocol.guidance_channels or settings["guidance_interval"]:
        interval = f" with interval {settings['guidance_interval']}" if settings["guidance_interval"] else ""
        found.append(f"guidance on {settings['guidance_channels']} channels{interval}, not the paper's first 3 "
                     "channels at every step")
    if (settings["sampler"], settings["steps"]) != (protocol.sampler, protocol.steps):
        found.append(f"{settings['steps']} {settings['sampler']} steps, not the paper's {protocol.steps} "
                     f"{protocol.sampler.upper()} steps")
    if num_samples < protocol.num_images:
        found.append(f"{num_samples:,} images, fewer than the paper's {protocol.num_images:,}")
    if settings["vae"] != protocol.vae:
        found.append(f"VAE {settings['vae']}, not the paper's {protocol.vae}")
    if settings["precision"] != protocol.precision:
        found.append(f"sampled in {settings['precision']}, not the paper's {protocol.precision}")
    return found


def check_samples(samples: Path, ref: Path, num_samples: int, resolution: int | None) -> tuple[dict | None, list]:
    """What the samples' provenance says about their protocol, and the warnings against the published one."""
    provenance = read_provenance(samples)
    if provenance is None:
        return None, []
    settings = protocol_of(provenance)
    paper = paper_result(ref.name, resolution, provenance)
    found = deviations(settings, num_samples) if paper else []
    report = {**settings, "paper": paper, "paper_protocol": PAPER_FID.describe() if paper else None,
              "deviations": found}
    return report, [f"{line}: not comparable with the published {paper}" for line in found]
