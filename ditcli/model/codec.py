"""Codecs between images and the space a DiT denoises: SD-VAE latents, or pixels for pixel-space models.

Images cross this boundary as float tensors in [-1, 1], (N, C, H, W). Every checkpoint records its codec as a plain
dict (`Codec.to_dict()`), so sampling picks the right one by itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from ditcli.errors import UserError
from ditcli.hub import hub_unreachable

VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
DEFAULT_VAE = VAE_ALIASES["ema"]  # the SD VAE the reference DiT checkpoints were trained with
LATENT_CHANNELS = 4  # the SD VAEs' latent channels: a 4-channel DiT without a codec record is a latent model
LATENT_DOWNSAMPLE = 8  # the SD VAEs' spatial downsampling (image size / latent size)
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
# The VAE's dtype in a run of each precision. bf16 runs decode in bf16 (docs/benchmarks.md states the error); fp16
# runs decode in fp32, since SD VAEs can overflow fp16 in their last up-blocks.
DECODE_DTYPES = {torch.bfloat16: torch.bfloat16}


def decode_dtype(run_dtype: torch.dtype) -> torch.dtype:
    """The dtype a VAE decodes in during a run of `run_dtype`."""
    return DECODE_DTYPES.get(run_dtype, torch.float32)


@dataclass
class PixelCodec:
    """The identity codec of pixel-space models: the model sees images in [-1, 1] directly."""

    channels: int = 3

    downsample = 1

    @property
    def latent_channels(self) -> int:
        return self.channels

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the 'posterior': the image itself with zero spread."""
        return images, torch.zeros_like(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)

    def decoding_in(self, dtype: torch.dtype) -> PixelCodec:
        return self

    def to_dict(self) -> dict:
        return {"kind": "pixel", "channels": self.channels}


class VaeCodec:
    """diffusers' AutoencoderKL; the latent scale comes from the VAE's own config (`scaling_factor`)."""

    downsample = LATENT_DOWNSAMPLE  # the SD VAEs; an instance reads its own from the config

    def __init__(self, vae, name: str, decode_batch: int = 8):
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.scale = float(vae.config.scaling_factor)
        self.decode_batch = decode_batch
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @classmethod
    def load(cls, name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             offline: bool = False, alternative: str | None = None) -> VaeCodec:
        """An AutoencoderKL from an alias (ema, mse), a hub id or a local directory, through the HF cache.

        `offline` (or HF_HUB_OFFLINE=1) uses the cache only; a VAE already in the cache is read without asking the
        hub. `alternative` names another way out (such as `--vae none`) in the error.
        """
        repo, local_only = locate_vae(name, offline, alternative)
        from diffusers import AutoencoderKL

        try:
            # diffusers' low-memory loading needs `accelerate`; asking for it without warns on every load.
            vae = AutoencoderKL.from_pretrained(repo, torch_dtype=dtype, local_files_only=local_only,
                                                low_cpu_mem_usage=find_spec("accelerate") is not None)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the VAE {repo!r}: {str(exc).splitlines()[0]}",
                            _vae_hint(alternative)) from None
        return cls(vae.to(device), repo)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) of unscaled latents for images in [-1, 1]."""
        param = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(param.device, param.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to images in [-1, 1], in batches of `decode_batch`."""
        param = next(self.vae.parameters())
        chunks = [self.vae.decode((z / self.scale).to(param.device, param.dtype)).sample.float().clamp(-1, 1)
                  for z in latents.split(self.decode_batch)]
        return torch.cat(chunks)

    def decoding_in(self, dtype: torch.dtype) -> VaeCodec:
        """This codec, or a copy whose VAE is cast to bf16 for a bf16 run (see DECODE_DTYPES)."""
        wanted = decode_dtype(dtype)
        if wanted == next(self.vae.parameters()).dtype:
            return self
        return VaeCodec(copy.deepcopy(self.vae).to(wanted), self.name, self.decode_batch)

    def to_dict(self) -> dict:
        return {"kind": "vae", "vae": self.name, "scale": self.scale}


def _vae_hint(alternative: str | None) -> str:
    hint = ("connect to the internet once so the Hugging Face cache holds it, or pass --vae with a local diffusers "
            "AutoencoderKL directory")
    return f"{hint}, or {alternative}" if alternative else hint


def locate_vae(name: str, offline: bool = False, alternative: str | None = None) -> tuple[str, bool]:
    """(repo or folder, whether the local files suffice), or a one-line error when the VAE cannot be had offline.

    Cheap: it reads the file system only, so commands call it before anything slow.
    """
    repo = VAE_ALIASES.get(name, name)
    folder = Path(repo).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"--vae {repo} is not a diffusers AutoencoderKL folder (no config.json)",
                            _vae_hint(alternative))
        return str(folder), True
    if looks_like_path(repo):
        raise UserError(f"VAE folder not found: {repo}",
                        "check the path" + (f", or {alternative}" if alternative else ""))
    if _in_hf_cache(repo):
        return repo, True
    if offline:
        raise UserError(f"cannot load the VAE {repo!r}: it is not in the Hugging Face cache and downloads are off",
                        _vae_hint(alternative))
    unreachable = hub_unreachable()
    if unreachable:
        raise UserError(f"cannot load the VAE {repo!r}: it is not in the Hugging Face cache and the hub cannot be "
                        f"reached ({unreachable})", _vae_hint(alternative))
    return repo, False


def looks_like_path(text: str) -> bool:
    """Hub ids are `owner/name`; anything else with a separator, a dot start or a home tilde is meant as a folder."""
    return text.startswith((".", "/", "~")) or text.count("/") != 1


def _in_hf_cache(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = [try_to_load_from_cache(repo, name) for name in ("config.json", VAE_WEIGHTS)]
    except ValueError:  # not a valid repo id
        return False
    return all(isinstance(path, str) for path in found)


def default_codec_spec(in_channels: int) -> dict | None:
    """The codec a file without a codec record implies: the SD VAE (ema) for a 4-channel model, else unknown."""
    return {"kind": "vae", "vae": DEFAULT_VAE} if in_channels == LATENT_CHANNELS else None


def codec_from_dict(spec: dict | None, device: torch.device | str = "cpu", in_channels: int = 4,
                    vae_override: str | None = None, offline: bool = False):
    """Rebuild the codec a checkpoint recorded; checkpoints without a record are SD-VAE latent models."""
    spec = spec or default_codec_spec(LATENT_CHANNELS)
    if spec["kind"] == "pixel":
        if vae_override:
            raise UserError("--vae does not apply: this checkpoint is a pixel-space model", "drop --vae")
        return PixelCodec(int(spec.get("channels", in_channels)))
    if spec["kind"] == "vae":
        return VaeCodec.load(vae_override or spec["vae"], device, offline=offline)
    raise UserError(f"unknown codec kind {spec['kind']!r} in the checkpoint", "expected 'pixel' or 'vae'")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N, C, H, W) to uint8 (N, H, W, C) exactly as DiT's sample_ddp.py: 127.5 x + 128, truncated."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) to [-1, 1] floats (N, C, H, W)."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
