"""``posmean``: the per-position mean token subtracted (the input-independent position term of
the DVT noise model, Yang et al., ECCV 2024, "Denoising Vision Transformers").

``z̃_p = z_p − (μ_p − μ)`` with ``μ_p`` the mean real token at patch position ``p`` and ``μ`` the
mean token, both from the fit's first pass. At another grid the offset is resampled bilinearly.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..stats import FitStatistics
from .base import Correction


def resample_grid(grid_tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(h, w, D)`` resampled (bilinear, no corner alignment) to ``grid``; unchanged when equal."""
    if tuple(grid_tokens.shape[:2]) == tuple(grid):
        return grid_tokens
    moved = grid_tokens.float().permute(2, 0, 1)[None]
    return F.interpolate(moved, size=tuple(grid), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)


class PositionMean(Correction):
    """Subtract the per-position offset the fit measured (see module doc)."""

    method = "posmean"
    requires = frozenset({"moments", "positions"})
    fitted = ("offset_",)
    source = "Yang et al., ECCV 2024 (DVT): the input-independent position term"

    offset_: Tensor  # (h, w, D)

    def fit(self, stats: FitStatistics, block: int) -> PositionMean:
        s = stats.blocks[block]
        return self.fit_offset(s.position_mean, s.moments.mean, block)

    def fit_offset(self, position_mean: Tensor, mean: Tensor, block: int) -> PositionMean:
        """From the mean token per position ``(h, w, D)`` and the mean token ``(D,)``."""
        self.offset_ = (position_mean.double() - mean.double()).float()
        self.block_, self.dim_ = block, int(mean.numel())
        return self

    def transform(self, tokens: Tensor) -> Tensor:
        offset = resample_grid(self.offset_, tuple(tokens.shape[-3:-1]))
        return tokens - offset.to(tokens.device, tokens.dtype)
