"""DINOv2's ViT (facebookresearch/dinov2, `DinoVisionTransformer`) and EDM2's FD-DINOv2 preprocessing, in plain PyTorch.

Module and key names follow the torch-hub checkpoints (`dinov2_vit*14_pretrain.pth`, `*_reg4_pretrain.pth`), so a
released file loads with `load_state_dict(strict=True)`. The size (embed dim, depth, MLP kind), the position grid
and the register count are read from the file's shapes; the head count is dim / 64 for every released size. What
the original does that a generic ViT may not:

- patch 14, a class token that carries `pos_embed[:, 0]`, and register tokens inserted after the position embedding,
  so that they get none;
- LayerScale after attention and after the MLP, LayerNorm eps 1e-6, exact (erf) GELU, qkv rows split as (3, heads, hd);
- the position grid resized for other input sizes with bicubic `F.interpolate` (`interpolate_pos_encoding`): the
  register-free models pass `scale_factor=(h0 + 0.1) / M` without antialias, the register models `size=(h0, w0)` with
  antialias.

The FD-DINOv2 feature (EDM2's `DINOv2Detector`, dgm-eval) is `forward`: the class token after the final norm, of
`edm2_preprocess`'s 224-px input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ditcli.downloads import DownloadError, ProgressFn, download, home_dir
from ditcli.errors import UserError
from ditcli.hub import is_offline
from ditcli.io import read_safetensors, safe_torch_load

PATCH_SIZE = 14
HEAD_DIM = 64  # every released size has heads = dim / 64: S (384, 6), B (768, 12), L (1024, 16), g (1536, 24)
LAYER_NORM_EPS = 1e-6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EDM2_INPUT_SIZE = 224  # DINOv2Detector resizes every image to 224 x 224, whatever its size or aspect
RESIZE_MODES = ("torch", "pil")  # EDM2's resize_mode: "torch" is its default, "pil" matches dgm-eval exactly
HUB_URL = "https://dl.fbaipublicfiles.com/dinov2"


class ReleasedWeights(NamedTuple):
    url: str
    sha256: str
    size: int  # bytes


# Hashes are public mirrors' Git-LFS object ids, not yet checked against a download of these URLs.
RELEASED_WEIGHTS: dict[str, ReleasedWeights] = {
    "dinov2_vitl14": ReleasedWeights(
        f"{HUB_URL}/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
        "d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428", 1_217_586_395),
    "dinov2_vitb14": ReleasedWeights(
        f"{HUB_URL}/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
        "0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73", 346_378_731),
}
FD_DINOV2_WEIGHTS = "dinov2_vitl14"  # EDM2 and dgm-eval both score with ViT-L/14


@dataclass(frozen=True)
class DINOv2Config:
    """The constructor arguments of `DinoVisionTransformer` that change the arithmetic."""

    embed_dim: int
    depth: int
    num_heads: int
    grid_size: int  # M: the stored position grid is M x M (img_size / 14; 37 for the released 518 px)
    mlp_hidden: int  # 4 D for the 'mlp' FFN (S/B/L); SwiGLU's hidden width for ViT-g
    swiglu: bool = False  # ViT-g's `swiglufused` FFN (keys mlp.w12 / mlp.w3) instead of mlp.fc1 / mlp.fc2
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> DINOv2Config:
        """The config a torch-hub state dict was built with; registers imply the `_reg` interpolation settings."""
        dim = state["cls_token"].shape[-1]
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        grid_size = math.isqrt(state["pos_embed"].shape[1] - 1)
        swiglu = "blocks.0.mlp.w3.weight" in state
        hidden = state["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[1 if swiglu else 0]
        registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
        return cls(dim, depth, num_heads or dim // HEAD_DIM, grid_size, hidden, swiglu, registers,
                   interpolate_antialias=registers > 0, interpolate_offset=0.0 if registers else 0.1)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h0 * w0, D), row-major (row = height)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention; the 3D qkv output is [q | k | v], each head-major (dinov2 `Attention`)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, n, hd)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, n, T, hd)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, n, T, hd), scale 1 / sqrt(hd)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf form
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """ViT-g's FFN (dinov2 `SwiGLUFFN`): w3(silu(x1) * x2) with [x1 | x2] = w12(x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, config: DINOv2Config):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, config.num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = (SwiGLUFFN if config.swiglu else Mlp)(dim, config.mlp_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Features(NamedTuple):
    """dinov2's `forward_features` dict as fields (x_norm_regtokens is (B, 0, D) without registers)."""

    x_norm_clstoken: torch.Tensor  # (B, D)
    x_norm_regtokens: torch.Tensor  # (B, R, D)
    x_norm_patchtokens: torch.Tensor  # (B, N, D), row-major patch order
    x_prenorm: torch.Tensor  # (B, 1 + R + N, D)


class DINOv2(nn.Module):
    """DINOv2's `DinoVisionTransformer` in eval mode, with the torch-hub key layout."""

    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.config = config
        dim, grid = config.embed_dim, config.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The (1, 1 + N, D) position embedding of an input of height x width px (dinov2 `interpolate_pos_encoding`).

        As the original, the grid is kept when the token count is M * M and the input is square, and otherwise resized
        as float32 with bicubic `F.interpolate`: by `scale_factor=(h0 + offset) / M` (torch maps coordinates with that
        given factor, not with h0 / M) when `interpolate_offset` is set, else to `size=(h0, w0)`.
        """
        config, grid = self.config, self.config.grid_size
        if num_patches == grid * grid and height == width:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        h0, w0 = height // PATCH_SIZE, width // PATCH_SIZE
        if config.interpolate_offset:
            offset = config.interpolate_offset
            target = {"scale_factor": ((h0 + offset) / grid, (w0 + offset) / grid)}
        else:
            target = {"size": (h0, w0)}
        patch = pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, D, M, M), rows = height
        patch = F.interpolate(patch, mode="bicubic", antialias=config.interpolate_antialias, **target)  # (1, D, h0, w0)
        patch = patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)  # (1, N, D)
        return torch.cat([pos_embed[:, :1], patch], dim=1).to(dtype)  # (1, 1 + N, D)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens entering block 0, [cls + pos, registers, patches + pos] (dinov2 `prepare_tokens_with_masks`)."""
        B, _, H, W = x.shape
        tokens = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            tokens = torch.where(masks[..., None], self.mask_token.to(tokens.dtype)[None], tokens)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, 1 + N, D)
        tokens = tokens + self.interpolate_pos_encoding(tokens.shape[1] - 1, H, W, tokens.dtype)
        if self.config.num_register_tokens:
            registers = self.register_tokens.expand(B, -1, -1)  # (B, R, D), no position embedding
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)  # (B, 1 + R + N, D)
        return tokens

    def block_outputs(self, x: torch.Tensor, n: int | Sequence[int] = 1) -> list[torch.Tensor]:
        """All tokens (B, 1 + R + N, D) after the last n blocks, or after the listed blocks, in block order."""
        keep = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n
        tokens, outputs = self.prepare_tokens(x), []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in keep:
                outputs.append(tokens)
        return outputs

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> Features:
        tokens = self.prepare_tokens(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        normed, R = self.norm(tokens), self.config.num_register_tokens
        return Features(normed[:, 0], normed[:, 1:1 + R], normed[:, 1 + R:], tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised class token (B, D): the FD-DINOv2 feature of EDM2 and dgm-eval."""
        return self.forward_features(x).x_norm_clstoken

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple:
        """dinov2's `get_intermediate_layers`: patch tokens (registers dropped) of the last n or the listed blocks."""
        outputs = self.block_outputs(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]  # (B, D)
        patches = [out[:, 1 + self.config.num_register_tokens:] for out in outputs]  # (B, N, D)
        if reshape:
            B, _, H, W = x.shape
            patches = [p.reshape(B, H // PATCH_SIZE, W // PATCH_SIZE, -1).permute(0, 3, 1, 2).contiguous()
                       for p in patches]  # (B, D, h0, w0)
        return tuple(zip(patches, class_tokens)) if return_class_token else tuple(patches)


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """A torch-hub DINOv2 state dict from a .pth (weights-only load) or a .safetensors file with the same keys."""
    path = Path(path)
    state = read_safetensors(path)[0] if path.suffix == ".safetensors" else safe_torch_load(path)
    if not isinstance(state, Mapping) or "cls_token" not in state or "pos_embed" not in state:
        raise UserError(f"{path} is not a DINOv2 backbone state dict (no cls_token / pos_embed)",
                        "pass a torch-hub dinov2_vit*14 checkpoint, e.g. dinov2_vitl14_pretrain.pth")
    return dict(state)


def load_dinov2(path: Path | str, device: torch.device | str = "cpu", num_heads: int | None = None) -> DINOv2:
    """The DINOv2 backbone of a torch-hub checkpoint, its size and registers read from the shapes, in eval mode."""
    state = read_state_dict(path)
    config = DINOv2Config.from_state_dict(state, num_heads)
    if config.num_heads < 1 or config.embed_dim % config.num_heads:
        raise UserError(f"{path}: a DINOv2 of embed dim {config.embed_dim} cannot have {config.num_heads} heads",
                        f'dim / 64 holds for the released sizes; for another, write {{"num_heads": N}} to '
                        f"{Path(path).name}.json beside it")
    model = DINOv2(config)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f"{path} does not match the DINOv2 layout its shapes imply (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]})",
                        "pass an unmodified torch-hub dinov2_vit*14 checkpoint")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def edm2_preprocess(images: torch.Tensor, resize_mode: str = "torch") -> torch.Tensor:
    """uint8 (B, 3, H, W) RGB -> the float32 (B, 3, 224, 224) model input of EDM2's `DINOv2Detector.__call__`.

    'torch' (EDM2's default): antialiased bicubic `F.interpolate` of the float32 pixels, neither clamped nor rounded.
    'pil' (dgm-eval's pipeline): Pillow's bicubic resize of each uint8 image. Then /255, -mean, /std in float32.
    """
    if resize_mode == "pil":
        size = (EDM2_INPUT_SIZE, EDM2_INPUT_SIZE)
        hwc = images.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()  # (B, H, W, 3)
        resized = np.stack([np.asarray(Image.fromarray(im, "RGB").resize(size, Image.Resampling.BICUBIC))
                            for im in hwc])  # (B, 224, 224, 3)
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(images.device)  # (B, 3, 224, 224) uint8
    elif resize_mode == "torch":
        x = F.interpolate(images.to(torch.float32), size=(EDM2_INPUT_SIZE, EDM2_INPUT_SIZE), mode="bicubic",
                          antialias=True)  # (B, 3, 224, 224)
    else:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {resize_mode!r}")
    return normalize_imagenet(x.to(torch.float32) / 255)


def normalize_imagenet(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per RGB channel, the constants rounded to x's dtype as EDM2's `misc.const_like`."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std


# FD-DINOv2 in `dit fid --features dinov2`.

def fetch_dinov2_weights(spec: str | Path | None = None, progress: ProgressFn = None) -> Path:
    """The weight file for `--dinov2-weights PATH|URL`: a local file as it is; a URL (default: the released ViT-L/14)
    downloaded once into the home directory ($DIT_HOME or ~/.cache/ditcli), with the size and sha256 of
    `RELEASED_WEIGHTS` checked before it is renamed into place where the URL is a released one."""
    spec = None if spec is None else str(spec)
    if spec is not None and not spec.startswith(("http://", "https://")):
        if not Path(spec).is_file():
            raise UserError(f"DINOv2 weights not found: {spec}",
                            "pass --dinov2-weights PATH of a torch-hub checkpoint, or a URL")
        return Path(spec)
    url = spec or RELEASED_WEIGHTS[FD_DINOV2_WEIGHTS].url
    released = next((w for w in RELEASED_WEIGHTS.values() if w.url == url), None)
    dest = home_dir() / url.rstrip("/").rsplit("/", 1)[-1]
    if dest.is_file():  # only a download that passed its checks is renamed to this name
        return dest
    hint = f"download {url} to {dest}, or pass --dinov2-weights PATH"
    if is_offline():
        raise UserError(f"the DINOv2 weights are not in {dest.parent} and downloads are off (offline)", hint)
    try:
        return download(url, dest, size=released.size if released else None,
                        sha256=released.sha256 if released else None, progress=progress)
    except DownloadError as exc:
        raise UserError(f"the DINOv2 weights are not in {dest.parent} and the download failed: {exc}",
                        hint) from None


def sidecar_num_heads(path: Path) -> int | None:
    """The head count of `PATH.json` ({"num_heads": N}) beside a checkpoint, else None (dim / 64, as every released
    size): the shapes of a state dict do not give the head count of a model of another width."""
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return None
    try:
        heads = json.loads(sidecar.read_text())["num_heads"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise UserError(f"cannot read num_heads from {sidecar}: {exc}", 'write {"num_heads": N} there') from None
    if not isinstance(heads, int) or heads < 1:
        raise UserError(f"{sidecar} gives num_heads {heads!r}", "write a positive integer")
    return heads


def dinov2_extractor(weights: str | Path | None, device: torch.device):
    """The `--features dinov2` callable: uint8 (N, C, H, W) in, {"pool": the (N, D) class token} out, of EDM2's
    default preprocessing (`edm2_preprocess(x, "torch")`); grayscale images are repeated to 3 channels."""
    path = fetch_dinov2_weights(weights)
    model = load_dinov2(path, device, sidecar_num_heads(path))

    @torch.inference_mode()
    def extract(images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return {"pool": model(edm2_preprocess(images, "torch"))}

    return extract
