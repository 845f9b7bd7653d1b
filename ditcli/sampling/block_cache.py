"""Feature caching for sampling: reuse the deep blocks' work across neighbouring model evaluations, training-free.

The rule is first-block caching (FBCache) with TeaCache's accumulation. Every evaluation runs the embedders, the
first block and the final layer. The first block's residual is compared with the previous evaluation's; while the
relative changes, summed since the last full evaluation, stay under the threshold, the other blocks are skipped and
the residual they added last time is added again. Threshold 0 never skips, and gives the uncached images bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ditcli.errors import UserValueError

# Rows per matmul come in multiples of this: kernels may round differently for another row count (see
# `generate.batch_width`), so every forward, and every subset of rows a cache runs, is padded to it.
ROW_QUANTUM = 4


def check_threshold(threshold: float | None) -> None:
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise UserValueError(f"the cache threshold must be a finite number >= 0, got {threshold}")


class BlockCache(nn.Module):
    """A DiT (or its `CastWeights` copy) that skips blocks 2..depth while the first block barely changes.

    Each row (image, or its unguided half) decides for itself, so an image's pixels do not depend on the batch it
    shares. Only the rows over their threshold run the deep blocks, padded to ROW_QUANTUM rows (the width the matmul
    kernels give row-independent results at); the others add their cached residual. Make one per batch: its state is
    the previous evaluation of that batch. `full` counts the evaluations in which some row ran the deep blocks;
    `reused` counts skipped rows in evaluations' worth (a batch whose rows all skip adds 1).
    """

    def __init__(self, net: nn.Module, threshold: float):
        super().__init__()
        check_threshold(threshold)
        self.dit = getattr(net, "inner", net)  # the DiT under a CastWeights wrapper
        self.config, self.threshold = net.config, threshold
        self.dtype = next(self.dit.parameters()).dtype
        self.previous: torch.Tensor | None = None  # the first block's residual at the last evaluation
        self.tail: torch.Tensor | None = None  # per row, what blocks 2..depth added at its last full evaluation
        self.drift: torch.Tensor | None = None  # per row, the relative changes summed since then
        self.full, self.reused = 0, 0.0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, c = self.dit.embed(x.to(self.dtype), t, y)  # (N, T, D), (N, D)
        first = self.dit.blocks[0](h, c)  # (N, T, D)
        residual = first - h
        reuse = self.may_reuse(residual)  # (N,)
        rows = torch.nonzero(~reuse).flatten()  # (K,) the rows that run the deep blocks
        if len(rows) == len(reuse):
            out = self.deep(first, c)  # every row's blocks' own output, so threshold 0 is the uncached model
            self.tail = out - first
        else:
            out = first + self.tail
            if len(rows):
                deep = self.deep(first[rows], c[rows])  # (K, T, D)
                out = out.index_copy(0, rows, deep)
                self.tail = self.tail.index_copy(0, rows, deep - first[rows])
        self.full += int(len(rows) > 0)
        self.reused += 1 - len(rows) / len(reuse)
        self.drift = torch.where(reuse, self.drift, 0.0)
        self.previous = residual
        return self.dit.head(out, c).float()

    def deep(self, first: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Blocks 2..depth on these rows, padded by repeating the last row to a multiple of ROW_QUANTUM."""
        count = len(first)
        pad = -count % ROW_QUANTUM
        if pad:
            first, c = torch.cat([first, first[-1:].expand(pad, -1, -1)]), torch.cat([c, c[-1:].expand(pad, -1)])
        out = first
        for block in self.dit.blocks[1:]:
            out = block(out, c)  # (K, T, D)
        return out[:count]

    def may_reuse(self, residual: torch.Tensor) -> torch.Tensor:
        """Per row: add this evaluation's relative change of the first block's residual (the mean absolute
        difference over the previous one's mean magnitude) to the drift; reuse while it stays under the threshold."""
        if self.previous is None or self.previous.shape != residual.shape:  # a new batch, or guidance's half batch
            self.drift = residual.new_zeros(residual.shape[0], dtype=torch.float32)
            return torch.zeros_like(self.drift, dtype=torch.bool)
        change = ((residual - self.previous).flatten(1).abs().mean(1)
                  / self.previous.flatten(1).abs().mean(1).clamp_min(1e-12))  # (N,)
        self.drift = self.drift + change.float()
        return self.drift < self.threshold
