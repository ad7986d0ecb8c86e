"""Patch masks ``(B, N)`` bool (True = masked) with exactly ``round(ratio·N)`` masked patches
per image, so encoders that drop masked tokens (MAE, SemanticMIM) can batch them."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def masked_count(num_patches: int, ratio: float) -> int:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    return max(1, min(num_patches - 1, round(ratio * num_patches)))


def random_mask(batch: int, grid: tuple[int, int], ratio: float, gen: torch.Generator) -> Tensor:
    """Uniformly random patches (MAE, SemanticMIM)."""
    n = grid[0] * grid[1]
    k = masked_count(n, ratio)
    order = torch.rand(batch, n, generator=gen).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def block_mask(
    batch: int, grid: tuple[int, int], ratio: float, gen: torch.Generator,
    min_block: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> Tensor:
    """BEiT-style block-wise masking: random rectangles (area ≥ ``min_block`` patches, aspect in
    ``aspect``) until the target count is reached; overshoot is trimmed at random."""
    gh, gw = grid
    n = gh * gw
    k = masked_count(n, ratio)
    out = torch.zeros(batch, n, dtype=torch.bool)
    for b in range(batch):
        m = torch.zeros(gh, gw, dtype=torch.bool)
        for _ in range(100):
            count = int(m.sum())
            if count >= k:
                break
            area = float(torch.empty(1).uniform_(min_block, max(min_block, k - count), generator=gen))
            log_aspect = float(torch.empty(1).uniform_(math.log(aspect[0]), math.log(aspect[1]), generator=gen))
            h = max(1, min(gh, round(math.sqrt(area * math.exp(log_aspect)))))
            w = max(1, min(gw, round(math.sqrt(area / math.exp(log_aspect)))))
            top = int(torch.randint(gh - h + 1, (1,), generator=gen))
            left = int(torch.randint(gw - w + 1, (1,), generator=gen))
            m[top : top + h, left : left + w] = True
        flat = m.flatten()
        score = torch.rand(n, generator=gen) + flat.float() * 2  # masked first, random within
        out[b, score.argsort(descending=True)[:k]] = True
    return out


def make_mask(kind: str, batch: int, grid: tuple[int, int], ratio: float, gen: torch.Generator) -> Tensor:
    if kind == "random":
        return random_mask(batch, grid, ratio, gen)
    if kind == "block":
        return block_mask(batch, grid, ratio, gen)
    raise ValueError(f"unknown masking {kind!r}; use 'random' or 'block'")
