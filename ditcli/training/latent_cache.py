"""The latent cache: the VAE posterior (mean, std) of every training image and its flip, encoded once and kept in
float16 shards, so later epochs and resumed runs skip the encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ditcli.data.sources import ImageSet
from ditcli.errors import UserError
from ditcli.io import replacing, write_json
from ditcli.model.codec import from_uint8


class LatentCache:
    """Posterior (mean, std) of every image and its horizontal flip, in float16 shards memory-mapped at train time.

    Layout: `meta.json` (VAE id, latent scale, size, source fingerprint) and `shard-XXXXX-{mean,std}.npy`, each
    (n, 2, C, h, w) with index 0 the image and 1 its flip. Ranks encode disjoint shards; meta.json is written last, so
    a cache without it is incomplete and is rebuilt.
    """

    SHARD = 4096

    def __init__(self, root: Path):
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.scale = float(self.meta["scale"])
        shards = range(self.meta["num_shards"])
        self.mean = [np.load(self.root / f"shard-{i:05d}-mean.npy", mmap_mode="r") for i in shards]
        self.std = [np.load(self.root / f"shard-{i:05d}-std.npy", mmap_mode="r") for i in shards]

    @staticmethod
    def matches(root: Path, expected: dict) -> bool:
        meta_path = Path(root) / "meta.json"
        if not meta_path.exists():
            return False
        meta = json.loads(meta_path.read_text())
        return all(meta.get(k) == v for k, v in expected.items())

    @classmethod
    def open(cls, root: Path, expected: dict) -> LatentCache:
        """The cache at `root`, which must be whole and match `expected` (as `matches` checked on rank 0)."""
        cache = cls(root)
        stale = [k for k, v in expected.items() if cache.meta.get(k) != v]
        if stale:
            raise UserError(f"the latent cache {root} holds other data ({', '.join(stale)} differ)")
        return cache

    @classmethod
    def build(cls, root: Path, images: ImageSet, codec, expected: dict, rank: int = 0, world: int = 1,
              batch_size: int = 32, barrier=None, on_progress=None) -> None:
        """Encode the shards of this rank; rank 0 writes meta.json after everyone is done. Each rank then opens
        the cache with `open`, which proves it sees what the others wrote."""
        root.mkdir(parents=True, exist_ok=True)
        num_shards = (len(images) + cls.SHARD - 1) // cls.SHARD
        for shard in range(rank, num_shards, world):
            lo, hi = shard * cls.SHARD, min(len(images), (shard + 1) * cls.SHARD)
            means, stds = [], []
            for start in range(lo, hi, batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images.images[start: min(hi, start + batch_size)]))
                x = from_uint8(batch)  # (n, C, H, W)
                mean, std = codec.encode(torch.cat([x, x.flip(3)]))  # (2n, c, h, w)
                means.append(torch.stack(mean.chunk(2), dim=1).half().cpu().numpy())  # (n, 2, c, h, w)
                stds.append(torch.stack(std.chunk(2), dim=1).half().cpu().numpy())
                if on_progress is not None:
                    on_progress(len(batch))
            for kind, arrays in (("mean", means), ("std", stds)):
                _atomic_npy(root / f"shard-{shard:05d}-{kind}.npy", np.concatenate(arrays))
        if barrier is not None:
            barrier()
        if rank == 0:
            meta = dict(expected, num_shards=num_shards, count=len(images))
            write_json(root / "meta.json", meta)
        if barrier is not None:
            barrier()

    def gather(self, indices: np.ndarray, flips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) float32 of the chosen images, each as itself or its flip."""
        rows = [(self.mean[i // self.SHARD][i % self.SHARD, f], self.std[i // self.SHARD][i % self.SHARD, f])
                for i, f in zip(indices.tolist(), flips.tolist())]
        mean = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.float32))  # (n, c, h, w)
        std = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.float32))
        return mean, std


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:  # an open file: np.save would append .npy to a bare path
        np.save(f, array)
