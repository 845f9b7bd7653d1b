"""The Fashion-MNIST judge: a small CNN classifier, trained on the train split only, that scores generated images.

Its penultimate 128-d activations are the feature space for a Fréchet distance (`dit fid --features
fashion-judge`), and its predictions give the class-conditional accuracy of the embedded model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ditcli.errors import UserError
from ditcli.io import read_safetensors
from ditcli.model.codec import from_uint8
from ditcli.weights.registry import CHECKOUT_WEIGHTS

JUDGE_NAME = "fashion-judge"
JUDGE_FILE = CHECKOUT_WEIGHTS / "fashion-judge.safetensors"


class FashionJudge(nn.Module):
    """Two conv stages (28 -> 14 -> 7) and a 128-d feature layer before the 10-way classifier."""

    def __init__(self, width: int = 32, features: int = 128, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * width * 7 * 7, features)
        self.head = nn.Linear(features, num_classes)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 128) for images in [-1, 1], (N, 1, 28, 28)."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (N, 10) logits


def load_judge(path: Path | None = None, device: torch.device | str = "cpu") -> FashionJudge:
    path = Path(path or JUDGE_FILE)
    if not path.exists():
        raise UserError(f"judge weights not found: {path}", "run python benchmarks/fashion_judge.py to train them")
    judge = FashionJudge()
    judge.load_state_dict(read_safetensors(path)[0])
    return judge.to(device).eval()


def save_judge(judge: FashionJudge, path: Path, accuracy: float) -> None:
    state = {k: v.contiguous() for k, v in judge.state_dict().items()}
    save_file(state, str(path), metadata={"feature_extractor": JUDGE_NAME, "test_accuracy": f"{accuracy:.4f}"})


def judge_extractor(path: Path | None, device: torch.device):
    """The feature-extractor callable `dit fid` expects: uint8 (N, C, H, W) in, {"pool", "logits"} out."""
    judge = load_judge(path, device)

    @torch.no_grad()
    def extract(images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = from_uint8(images[:, :1].permute(0, 2, 3, 1))  # (N, 1, H, W); grayscale: the channels are copies
        if x.shape[-1] != 28:
            x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        features = judge.features(x)
        return {"pool": features, "logits": judge.head(features)}

    return extract
