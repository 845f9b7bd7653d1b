"""The TF Inception-v3 graph of 2015-12-05 behind published FIDs, in PyTorch, with one forward for ADM's metrics.

The weights are torch-fidelity's conversion of that graph, `weights-inception-2015-12-05-6726825d.pth` (the same bytes
pytorch-fid publishes as `pt_inception-2015-12-05-6726825d.pth`). Module and key names follow that file, so it loads
with `load_state_dict`. What the graph does that torchvision's Inception-v3 does not:

- a TF1 bilinear resize to 299 (`resize_bilinear_tf1`) and the scaling (x - 128) / 128;
- average pools inside the blocks that ignore padding (TF's SAME pooling), and a max pool in the last block;
- BatchNorm with eps 1e-3 and no bias in the convolutions.

One forward gives what guided-diffusion's `evaluations/evaluator.py` reads from the graph: `pool_3` (2048), the first
7 channels of `mixed_6/conv` flattened in TF's (H, W, C) order (17 * 17 * 7 = 2023), and `pool_3 @ W`, the
`softmax/logits/MatMul` output without the bias that ADM's Inception Score applies its softmax to (1008 classes).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ditcli.downloads import DownloadError, ProgressFn, download, home_dir
from ditcli.errors import UserError
from ditcli.hub import is_offline
from ditcli.io import safe_torch_load

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7] for sFID.
NUM_CLASSES = 1008  # The 2015 graph's softmax has 1008 outputs (1000 ImageNet classes plus unused ones).


class InceptionFeatures(NamedTuple):
    pool: torch.Tensor  # (N, 2048) pool_3
    spatial: torch.Tensor  # (N, 2023) mixed_6/conv[..., :7] in (H, W, C) order
    logits: torch.Tensor  # (N, 1008) pool_3 @ W, no bias


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `ResizeBilinear` (align_corners=False, no half-pixel centres) of (N, C, H, W) floats to (size, size).

    TF1 samples output pixel i at source coordinate i * (in / out), with no half-pixel shift, so the last rows and
    columns repeat the edge and the image shifts by up to half a pixel compared with `F.interpolate`. It blends along
    the width first, then the height, each as a + (b - a) * t in float32; we do the same steps in the same order.
    """
    return _lerp_along(_lerp_along(x, size, dim=3), size, dim=2)


def _lerp_along(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linear interpolation of one axis to `size` samples at i * in / out, as TF1's compute_interpolation_weights."""
    n = x.shape[dim]
    if n == size:
        return x
    scale = torch.tensor(n, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)  # float32, as TF
    source = torch.arange(size, dtype=torch.float32) * scale
    lower = source.floor()
    lower_index = lower.long().clamp(0, n - 1).to(x.device)
    upper_index = source.ceil().long().clamp(max=n - 1).to(x.device)
    shape = [1] * x.dim()
    shape[dim] = size
    weight = (source - lower).to(x.device, x.dtype).view(shape)  # broadcast along `dim`
    a, b = x.index_select(dim, lower_index), x.index_select(dim, upper_index)
    return a + (b - a) * weight


class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3, as the TF graph) and ReLU: one `conv` node of the graph."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)  # in place on a fresh tensor: one allocation, not two

    def fold_batchnorm(self) -> None:
        """One convolution for conv then BatchNorm at inference: weight W * s and bias beta - mean * s with
        s = gamma / sqrt(var + eps), computed in float64 and rounded once to the weights' dtype."""
        conv, bn = self.conv, self.bn
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()  # (C_out,)
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)  # (C_out, C_in, kH, kW)
        bias = bn.bias.double() - bn.running_mean.double() * scale
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        self.bn = nn.Identity()


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 SAME average pool that, like TF's, averages only the pixels inside the image."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """mixed, mixed_1, mixed_2 (35x35): 1x1, 5x5, double 3x3 and pooled towers."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower_5x5 = self.branch5x5_2(self.branch5x5_1(x))
        tower_3x3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pooled = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), tower_5x5, tower_3x3, pooled], dim=1)


class ReductionA(nn.Module):
    """mixed_3 (35x35 to 17x17): strided 3x3, strided double 3x3 and a max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower_3x3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), tower_3x3, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """mixed_4 to mixed_7 (17x17): factorised 7x7 towers; channel 0.. of the output is the block's `conv` node."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c, 1)
        self.branch7x7_2 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c, 1)
        self.branch7x7dbl_2 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower_7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        tower_dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            tower_dbl = layer(tower_dbl)
        pooled = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), tower_7x7, tower_dbl, pooled], dim=1)


class ReductionB(nn.Module):
    """mixed_8 (17x17 to 8x8): strided 3x3, strided 7x7-then-3x3 and a max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower_3x3 = self.branch3x3_2(self.branch3x3_1(x))
        tower_7x7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([tower_3x3, tower_7x7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """mixed_9 and mixed_10 (8x8): split 1x3/3x1 towers. The graph pools by average in mixed_9, by max in mixed_10."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.branch3x3_1(x)
        tower_3x3 = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], dim=1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        tower_dbl = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], dim=1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), tower_3x3, tower_dbl, self.branch_pool(pooled)], dim=1)


class InceptionV3(nn.Module):
    """The 2015-12-05 graph up to pool_3 and the logits; input uint8 (N, 3, H, W) RGB of any size, computed in the
    dtype of the weights (float32 as the graph; tests use float64 to separate logic from rounding)."""

    num_features = 2048  # pool_3, also read by torchmetrics' FrechetInceptionDistance(feature=...)
    input_size = INPUT_SIZE  # the graph's; tests shrink it (down to 75) to run every layer cheaply

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = ReductionA(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)  # the graph's mixed_6
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = ReductionB(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        x = resize_bilinear_tf1(images.to(self.fc.weight.dtype), self.input_size)  # (N, 3, 299, 299)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        x = self.Mixed_6d(x)  # (N, 768, 17, 17); channels 0..191 are mixed_6/conv
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17 * 17 * 7) in TF's (H, W, C) order
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048) pool_3
        return InceptionFeatures(pool, spatial, F.linear(pool, self.fc.weight))

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "the state dict") -> InceptionV3:
        """Load torch-fidelity's key layout, checking every key and shape (BatchNorm step counters are ignored)."""
        def ours(keys):
            return {k for k in keys if not k.endswith("num_batches_tracked")}

        expected, given = self.state_dict(), ours(state_dict)
        missing, unexpected = sorted(ours(expected) - given), sorted(given - ours(expected))
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise UserError(f"{source} is not the TF Inception-v3 weight file: {len(missing)} keys missing and "
                            f"{len(unexpected)} unexpected (e.g. {example})", f"use {WEIGHTS_NAME} from {WEIGHTS_URL}")
        for key in sorted(given):
            if tuple(state_dict[key].shape) != tuple(expected[key].shape):
                raise UserError(f"{source}: {key} has shape {tuple(state_dict[key].shape)}, expected "
                                f"{tuple(expected[key].shape)}", f"use {WEIGHTS_NAME} from {WEIGHTS_URL}")
        counters = {k: torch.zeros((), dtype=torch.long) for k in expected if k.endswith("num_batches_tracked")}
        self.load_state_dict({**counters, **{k: state_dict[k].float() for k in given}}, strict=True, assign=True)
        return self.eval().requires_grad_(False)

    def fold_batchnorm(self) -> InceptionV3:
        """Fold each BatchNorm into its convolution for inference: the same function up to float32 rounding, without
        94 passes over the activations. The state dict loses its bn keys, so load the weights first."""
        for module in self.modules():
            if isinstance(module, ConvBN) and isinstance(module.bn, nn.BatchNorm2d):
                module.fold_batchnorm()
        return self


def fetch_weights(url: str | None = None, sha256: str = WEIGHTS_SHA256, dest: Path | None = None,
                  progress: ProgressFn = None) -> Path:
    """The weight file in the home directory ($DIT_HOME or ~/.cache/ditcli), downloaded from `url` (default
    WEIGHTS_URL) the first time by the shared resumable downloader, which checks the SHA-256 before renaming it."""
    url = url or WEIGHTS_URL
    dest = dest or home_dir() / WEIGHTS_NAME
    if dest.is_file():
        return dest
    hint = f"download {url} to {dest}, or pass --inception-weights PATH"
    if is_offline():
        raise UserError(f"the Inception weights are not in {dest.parent} and downloads are off (offline)", hint)
    try:
        return download(url, dest, sha256=sha256, progress=progress)
    except DownloadError as exc:
        raise UserError(f"the Inception weights are not in {dest.parent} and the download failed: {exc}",
                        hint) from None


def load_inception(weights: Path | str | None = None, device: torch.device | str = "cpu") -> InceptionV3:
    """The Inception with torch-fidelity's weights from `weights`, or from the cache (downloading them once), made
    ready for fast inference: BatchNorm folded into the convolutions and channels-last weights."""
    path = Path(weights) if weights is not None else fetch_weights()
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path}", f"download {WEIGHTS_URL}")
    try:
        state_dict = safe_torch_load(path)  # torch's own message would suggest weights_only=False: not for us
    except UserError as exc:
        raise UserError(f"cannot read the Inception weights: {exc.what}",
                        f"download {WEIGHTS_NAME} again from {WEIGHTS_URL}") from None
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} holds a {type(state_dict).__name__}, not a state dict", f"use {WEIGHTS_NAME}")
    with torch.device("meta"):  # no time spent on an initialisation the weights replace
        model = InceptionV3()
    model = model.load_weights(state_dict, str(path)).fold_batchnorm()
    # Channels-last weights make every convolution run in NHWC (oneDNN, cuDNN) without NCHW's per-layer reorders.
    return model.to(device, memory_format=torch.channels_last)
