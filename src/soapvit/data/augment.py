"""Batched image augmentations as tensor ops (no torchvision). Each takes images
``(B, 3, H, W)`` and a ``torch.Generator``, so a view is reproducible from its seed alone;
the photometric ones expect float values in [0, 1]."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=gen).to(device) * (high - low) + low


def random_resized_crop(
    images: Tensor,
    size: int | tuple[int, int],
    gen: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> Tensor:
    """Per-image crop of a random area fraction and aspect ratio, resized bilinearly to ``size``
    (``side`` or ``(height, width)``), mirrored with probability 1/2 when ``flip``."""
    b, dev = images.shape[0], images.device
    height, width = (size, size) if isinstance(size, int) else size
    area = _uniform(b, *scale, gen, dev)
    aspect = torch.exp(_uniform(b, math.log(ratio[0]), math.log(ratio[1]), gen, dev))
    crop_w = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the side
    crop_h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen).to(dev) * 2 - 1) * (1 - crop_w)
    cy = (torch.rand(b, generator=gen).to(dev) * 2 - 1) * (1 - crop_h)
    sign = torch.ones(b, device=dev)
    if flip:
        sign = torch.where(torch.rand(b, generator=gen).to(dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = crop_w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, cy
    grid = F.affine_grid(theta, (b, images.shape[1], height, width), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_flip(
    images: Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """:func:`random_resized_crop` of uint8 images back to their own size, as uint8."""
    views = random_resized_crop(images.float(), tuple(images.shape[-2:]), gen, scale, ratio)
    return views.round().clamp(0, 255).to(torch.uint8)


def _gray(images: Tensor) -> Tensor:
    w = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def color_jitter(
    images: Tensor,
    gen: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    p: float = 0.8,
) -> Tensor:
    """Brightness, contrast, saturation (factors in ``[1-x, 1+x]``) and hue (rotation of the
    YIQ chroma plane by up to ``hue`` turns), applied to each image with probability ``p``."""
    b, dev = images.shape[0], images.device
    view = (b, 1, 1, 1)
    out = images * _uniform(b, 1 - brightness, 1 + brightness, gen, dev).view(view)
    mean = _gray(out).mean((2, 3), keepdim=True)
    out = (out - mean) * _uniform(b, 1 - contrast, 1 + contrast, gen, dev).view(view) + mean
    gray = _gray(out)
    out = (out - gray) * _uniform(b, 1 - saturation, 1 + saturation, gen, dev).view(view) + gray
    angle = _uniform(b, -hue, hue, gen, dev) * 2 * math.pi
    to_yiq = images.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, out)
    cos, sin = torch.cos(angle).view(b, 1, 1), torch.sin(angle).view(b, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    out = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)
    apply = (torch.rand(b, generator=gen).to(dev) < p).view(view)
    return torch.where(apply, out, images)


def random_grayscale(images: Tensor, gen: torch.Generator, p: float = 0.2) -> Tensor:
    apply = (torch.rand(images.shape[0], generator=gen).to(images.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(images).expand_as(images), images)


def mix_labels(
    images: Tensor, labels: Tensor, num_classes: int, gen: torch.Generator,
    mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5, smoothing: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """DeiT-style batch Mixup or CutMix with label smoothing: ``(images, soft targets)``.

    One mixing coefficient per batch; the partner of image i is image ``B-1-i``."""
    off = smoothing / num_classes
    targets = F.one_hot(labels, num_classes).float() * (1 - smoothing) + off
    use_cutmix = torch.rand(1, generator=gen).item() < switch_prob
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = _beta(alpha, gen)
    flipped = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy = int(torch.randint(h, (1,), generator=gen))
        cx = int(torch.randint(w, (1,), generator=gen))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = images * lam + flipped * (1 - lam)
    return images, targets * lam + targets.flip(0) * (1 - lam)


def _beta(alpha: float, gen: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw from a numpy generator seeded by ``gen``."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
