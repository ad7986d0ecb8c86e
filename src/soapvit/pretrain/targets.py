"""Reconstruction targets per patch: normalised pixels (MAE) and HOG (MaskFeat), in torch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def patchify(images: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W)`` → ``(B, N, patch·patch·C)`` in row-major patch order, pixel-major inside."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def pixel_targets(images: Tensor, patch: int, eps: float = 1e-6) -> Tensor:
    """MAE ``norm_pix_loss`` targets: each patch's pixels standardised by its own mean/variance."""
    x = patchify(images, patch)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def hog_targets(images: Tensor, patch: int, cell: int = 4, bins: int = 9) -> Tensor:
    """MaskFeat HOG per patch ``(B, N, 3·(patch/cell)²·bins)``.

    Per RGB channel: gradients by the centred difference ``[-1, 0, 1]`` (zero padding),
    unsigned orientation in ``bins`` equal bins over [0, π) (hard assignment), magnitudes summed
    per ``cell × cell`` cell, each cell histogram L2-normalised; the cells of a patch are
    concatenated (channel, cell row, cell column, bin)."""
    if patch % cell:
        raise ValueError(f"patch size {patch} is not a multiple of the HOG cell size {cell}")
    b, c, h, w = images.shape
    kernel = images.new_tensor([-1.0, 0.0, 1.0])
    flat = images.reshape(b * c, 1, h, w)
    gx = F.conv2d(F.pad(flat, (1, 1, 0, 0)), kernel.view(1, 1, 1, 3))
    gy = F.conv2d(F.pad(flat, (0, 0, 1, 1)), kernel.view(1, 1, 3, 1))
    magnitude = torch.sqrt(gx**2 + gy**2)
    angle = torch.atan2(gy, gx) % math.pi
    index = (angle / math.pi * bins).floor().long().clamp_(0, bins - 1)
    hist = torch.zeros(b * c, bins, h, w, dtype=images.dtype, device=images.device)
    hist.scatter_(1, index, magnitude)
    cells = F.avg_pool2d(hist, cell) * cell * cell  # (B·C, bins, h/cell, w/cell)
    cells = F.normalize(cells, dim=1)
    per = patch // cell
    gh, gw = h // patch, w // patch
    cells = cells.reshape(b, c, bins, gh, per, gw, per)
    return cells.permute(0, 3, 5, 1, 4, 6, 2).reshape(b, gh * gw, c * per * per * bins)


def target_dim(kind: str, patch: int, cell: int = 4, bins: int = 9) -> int:
    if kind == "pixels":
        return 3 * patch * patch
    if kind == "hog":
        return 3 * (patch // cell) ** 2 * bins
    raise ValueError(f"unknown target {kind!r}; use 'pixels' or 'hog'")


def make_targets(kind: str, images: Tensor, patch: int) -> Tensor:
    """Targets of the (normalised) input images."""
    if kind == "pixels":
        return pixel_targets(images, patch)
    if kind == "hog":
        return hog_targets(images, patch)
    raise ValueError(f"unknown target {kind!r}; use 'pixels' or 'hog'")
