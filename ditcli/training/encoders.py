"""The frozen encoders that `dit train --align repa` aligns the model's tokens to: DINOv2 (REPA's choice) and the
Fashion-MNIST judge, a small CNN that Fashion-MNIST runs can use without downloading anything.

An encoder turns the batch's clean images (uint8 pixels, flipped as the model sees them) into one token per DiT
token. REPA feeds DINOv2 an image whose patch grid is the DiT's token grid (224 px, 16 x 16 patches of 14 px, for
SiT-XL/2 at 256 px: `224 * (resolution // 256)` in its code); the same rule, input side = token grid x the
encoder's stride, holds for any grid here, DINOv2's position embedding being interpolated to it. The judge's stride
is 4 (two 2x poolings), so its last feature map is the token grid: 7 x 7 for the 28 px Fashion-MNIST images at
patch 4.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ditcli.errors import UserError
from ditcli.evaluation.dinov2 import (
    PATCH_SIZE,
    fetch_dinov2_weights,
    load_dinov2,
    normalize_imagenet,
    sidecar_num_heads,
)
from ditcli.evaluation.judge import JUDGE_FILE, JUDGE_NAME, FashionJudge, load_judge
from ditcli.io import read_safetensors, safe_torch_load, safetensors_metadata
from ditcli.model.codec import from_uint8

DINOV2 = "dinov2"
ENCODER_NAMES = (DINOV2, JUDGE_NAME)  # --align-encoder takes these or a file of either kind
JUDGE_STRIDE = 4  # the judge's feature map is its input / 4


class DinoTokens:
    """DINOv2's normalised patch tokens (`x_norm_patchtokens`, REPA's target) of an image resized to the grid."""

    def __init__(self, model, name: str):
        self.model, self.name, self.dim = model, name, model.config.embed_dim

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, grid: int) -> torch.Tensor:
        """uint8 (N, C, H, W) -> (N, grid * grid, D), as REPA's `preprocess_raw_image`: /255, ImageNet mean and std,
        then bicubic to grid x 14 px; grayscale is repeated to RGB."""
        x = pixels.float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (N, 3, H, W)
        x = F.interpolate(normalize_imagenet(x), size=(grid * PATCH_SIZE, grid * PATCH_SIZE), mode="bicubic")
        return self.model.forward_features(x).x_norm_patchtokens  # (N, grid * grid, D)


class JudgeTokens:
    """The judge's last feature map (after its second pooling), one 64-d token per cell, row-major."""

    def __init__(self, judge: FashionJudge, name: str):
        self.judge, self.name = judge, name
        self.dim = judge.conv[-3].out_channels

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, grid: int) -> torch.Tensor:
        """uint8 (N, C, H, W) -> (N, grid * grid, 64): the judge's [-1, 1] grayscale input, resized (bilinear,
        antialiased, as its `dit fid` extractor) to grid x 4 px where that is not the image's size."""
        x = from_uint8(pixels[:, :1].permute(0, 2, 3, 1))  # (N, 1, H, W)
        side = grid * JUDGE_STRIDE
        if x.shape[-1] != side or x.shape[-2] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        return self.judge.conv(x).flatten(2).transpose(1, 2)  # (N, grid * grid, 64)


def load_encoder(spec: str, dinov2_weights: str | None, device: torch.device):
    """The encoder `--align-encoder` names: dinov2 (the file of --dinov2-weights, by default the released ViT-L/14,
    downloaded once), fashion-judge (weights/fashion-judge.safetensors), or a file of either kind."""
    if spec == DINOV2:
        path = fetch_dinov2_weights(dinov2_weights)
        return DinoTokens(load_dinov2(path, device, sidecar_num_heads(path)), f"DINOv2 ({path.name})")
    path = JUDGE_FILE if spec == JUDGE_NAME else Path(spec)
    if not path.is_file():
        raise UserError(f"--align-encoder {spec}: {path} not found",
                        f"pass {' or '.join(ENCODER_NAMES)}, or an existing DINOv2 or fashion-judge weight file")
    kind = encoder_kind(path)
    if kind == DINOV2:
        return DinoTokens(load_dinov2(path, device, sidecar_num_heads(path)), f"DINOv2 ({path.name})")
    return JudgeTokens(load_judge(path, device).requires_grad_(False), f"{JUDGE_NAME} ({path.name})")


def encoder_kind(path: Path) -> str:
    """dinov2 or fashion-judge, from the file's keys (and a judge's metadata); any other file is refused."""
    if path.suffix == ".safetensors":
        if safetensors_metadata(path).get("feature_extractor") == JUDGE_NAME:
            return JUDGE_NAME
        keys = set(read_safetensors(path)[0])
    else:
        data = safe_torch_load(path)
        keys = set(data) if isinstance(data, dict) else set()
    if {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= keys:
        return DINOV2
    if keys == set(FashionJudge().state_dict()):
        return JUDGE_NAME
    raise UserError(f"--align-encoder {path} is neither a DINOv2 backbone nor a {JUDGE_NAME} weight file",
                    "pass a torch-hub dinov2_vit*14 checkpoint, a fashion-judge .safetensors, or --align-encoder "
                    f"{' or '.join(ENCODER_NAMES)}")
