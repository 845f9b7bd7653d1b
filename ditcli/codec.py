"""Codecs between images and the space a DiT denoises: SD-VAE latents, or pixels for pixel-space models.

Images cross this boundary as float tensors in [-1, 1], (N, C, H, W). Every checkpoint records its codec as a plain
dict (`Codec.to_dict()`), so sampling picks the right one by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditcli.errors import UserError

VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


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

    def to_dict(self) -> dict:
        return {"kind": "pixel", "channels": self.channels}


class VaeCodec:
    """diffusers' AutoencoderKL; the latent scale comes from the VAE's own config (`scaling_factor`)."""

    downsample = 8  # the SD VAEs; an instance reads its own from the config

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
             offline: bool = False) -> VaeCodec:
        """An AutoencoderKL from an alias (ema, mse), a hub id or a local directory, through the HF cache.

        `offline` (or HF_HUB_OFFLINE=1) uses the cache only.
        """
        from diffusers import AutoencoderKL

        repo = VAE_ALIASES.get(name, name)
        try:
            vae = AutoencoderKL.from_pretrained(repo, torch_dtype=dtype, local_files_only=offline)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the VAE {repo!r}: {str(exc).splitlines()[0]}",
                            "connect to the internet once so the Hugging Face cache holds it, or pass --vae with a "
                            "local diffusers AutoencoderKL directory") from None
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

    def to_dict(self) -> dict:
        return {"kind": "vae", "vae": self.name, "scale": self.scale}


def codec_from_dict(spec: dict | None, device: torch.device | str = "cpu", in_channels: int = 4,
                    vae_override: str | None = None, offline: bool = False):
    """Rebuild the codec a checkpoint recorded; checkpoints without a record are SD-VAE latent models."""
    spec = spec or {"kind": "vae", "vae": VAE_ALIASES["ema"]}
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
