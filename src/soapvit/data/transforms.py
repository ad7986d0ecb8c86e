"""From decoded images to a backbone's input: one transform for PIL images and uint8 tensors.

:class:`ImageTransform` is built from the backbone's own preprocessing (mean, std, patch size,
training resolution) with :meth:`ImageTransform.for_backbone`, resizes so that both sides are
multiples of the patch size, and normalises with :func:`normalize`, the one normalisation of the
project (synthetic images and pre-training augmentations use it too).
"""

from __future__ import annotations

import math
import warnings

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import SoapvitError
from .images import NAME_KEY

RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
MODES = ("square", "aspect")
MAX_TOKENS = 8192
"""Most patch tokens an image becomes under aspect resizing (e.g. 1448x1448 at patch 16, 724x724 at
patch 8): global attention costs the square of it, so a larger photo is downscaled, with a warning."""


def normalize(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x − mean) / std`` per channel of ``(…, 3, H, W)`` values in [0, 1]."""
    m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    s = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return (pixels - m) / s


def denormalize(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Inverse of :func:`normalize`."""
    m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    s = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return pixels * s + m


def round_to_multiple(value: float, multiple: int) -> int:
    """Nearest positive multiple of ``multiple``."""
    return max(multiple, int(round(value / multiple)) * multiple)


@dataclass(frozen=True)
class ImageTransform:
    """Decoded image → normalised ``(3, H, W)`` float tensor with H, W multiples of the patch size.

    Accepts a PIL image (resized with PIL's ``resample`` filter) or a uint8 tensor ``(3, H, W)``
    (resized with torch, antialiased when shrinking: the fast path for images held in memory).

    Modes:
      - ``"square"``: resize to ``size × size`` (``size`` rounded to a multiple of the patch);
      - ``"aspect"``: keep the aspect ratio; if ``size`` is given, scale so the shorter side is
        ``size``; then resize each side to its nearest multiple of the patch (TokenCut style);
        an image beyond ``max_tokens`` patches is downscaled further, with a warning naming it.
    """

    mean: Sequence[float]
    std: Sequence[float]
    patch_size: int
    size: int | None = 224
    mode: str = "square"
    resample: str = "bicubic"
    max_tokens: int = MAX_TOKENS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SoapvitError(f"--resize must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.resample not in RESAMPLING:
            raise SoapvitError(f"--resample must be one of {', '.join(RESAMPLING)}, not {self.resample!r}")
        if self.mode == "square" and not self.size:
            raise SoapvitError("square resizing needs an image size")
        if self.size is not None and self.size < 2 * self.patch_size:
            raise SoapvitError(f"--image-size {self.size} gives fewer than 2x2 patches of size {self.patch_size}")

    def _uncapped_size(self, width: int, height: int) -> tuple[int, int]:
        p = self.patch_size
        if self.mode == "square":
            side = round_to_multiple(self.size, p)
            return side, side
        if self.size:
            scale = self.size / min(width, height)
            width, height = width * scale, height * scale
        return round_to_multiple(width, p), round_to_multiple(height, p)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image is resized to; under aspect resizing at most
        ``max_tokens`` patches (the largest grid of the same aspect ratio within it)."""
        p = self.patch_size
        size = self._uncapped_size(width, height)
        if self.mode == "square" or size[0] * size[1] <= self.max_tokens * p * p:
            return size
        scale = math.sqrt(self.max_tokens * p * p / (size[0] * size[1]))
        columns, rows = max(1, int(size[0] * scale / p)), max(1, int(size[1] * scale / p))
        while columns * rows > self.max_tokens:
            columns, rows = (columns - 1, rows) if columns >= rows else (columns, rows - 1)
        return columns * p, rows * p

    def _resized(self, width: int, height: int, name: str | None) -> tuple[int, int]:
        """:meth:`output_size`, with a warning naming the image when the token cap shrank it."""
        size, uncapped = self.output_size(width, height), self._uncapped_size(width, height)
        if size != uncapped:
            p = self.patch_size
            warnings.warn(f"{f'image {name}' if name else 'an image'} of {width}x{height} would be "
                          f"{uncapped[0] * uncapped[1] // (p * p)} tokens at {uncapped[0]}x{uncapped[1]}, more than "
                          f"{self.max_tokens} (MAX_TOKENS): downscaled to {size[0]}x{size[1]}", stacklevel=3)
        return size

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        if isinstance(image, Tensor):
            return self._from_uint8(image)
        size = self._resized(*image.size, image.info.get(NAME_KEY))
        if size != image.size:
            image = image.resize(size, RESAMPLING[self.resample])
        array = np.asarray(image, dtype=np.float32) / 255.0
        return normalize(torch.from_numpy(array).permute(2, 0, 1), self.mean, self.std)

    def _from_uint8(self, image: Tensor) -> Tensor:
        width, height = self._resized(image.shape[-1], image.shape[-2], None)
        x = image.float() / 255.0
        if x.shape[-2:] != (height, width):
            mode = "bicubic" if self.resample == "lanczos" else self.resample
            kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": height < x.shape[-2]}
            x = F.interpolate(x[None], size=(height, width), mode=mode, **kwargs)[0].clamp(0, 1)
        return normalize(x, self.mean, self.std)

    @classmethod
    def for_backbone(cls, backbone, size: int | None = None, mode: str = "square", resample: str = "bicubic"):
        """The transform a backbone expects (its mean/std/patch size); ``size`` defaults to the
        backbone's training resolution in square mode and to the image's own size in aspect mode."""
        return cls(
            mean=backbone.image_mean,
            std=backbone.image_std,
            patch_size=backbone.patch_size,
            size=size if size is not None else (backbone.image_size if mode == "square" else None),
            mode=mode,
            resample=resample,
        )
