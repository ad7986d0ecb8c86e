"""Reading images robustly and turning them into normalised tensors for a backbone.

One reader for the whole project: every image goes through :func:`load_image`, every folder
through :func:`list_images`, every model input through :class:`ImageTransform`. A dataset that
meets an unreadable file records it in ``skipped`` and moves on, so a long job never loses its
finished work to one bad image.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..errors import SoapvitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")

RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


class ImageReadError(SoapvitError):
    """An image file that cannot be decoded; the message names the file."""


class DataFolderError(SoapvitError):
    """A folder argument that is missing, not a folder, or holds no images."""


def list_images(folder: str | Path, limit: int | None = None, *, what: str = "--images",
                recursive: bool = False) -> list[Path]:
    """Sorted image files inside ``folder`` (by extension; with ``recursive`` also in its
    subfolders, e.g. ImageNet's class folders), at most ``limit``.

    Raises :class:`DataFolderError` naming ``what`` if the folder is missing or has no images.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataFolderError(f"{what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise DataFolderError(f"{what}: {folder} is not a folder")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataFolderError(f"{what}: folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files[:limit] if limit else files


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully as RGB (grayscale, palette, CMYK and alpha are converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err


def read_annotation(path: str | Path, size: tuple[int, int] | None = None, *, kind: str = "mask") -> Image.Image:
    """Decode an annotation (saliency mask, label map) as stored, without colour conversion; if
    ``size = (W, H)`` differs, resize with nearest neighbour and warn naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            annotation = img.copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"cannot read {kind} {path}: {err}") from err
    if size is not None and annotation.size != size:
        warnings.warn(f"{kind} {path} is {annotation.size[0]}x{annotation.size[1]} but its image is "
                      f"{size[0]}x{size[1]}: resized with nearest neighbour", stacklevel=3)
        annotation = annotation.resize(size, Image.Resampling.NEAREST)
    return annotation


def round_to_multiple(value: float, multiple: int) -> int:
    """Nearest positive multiple of ``multiple``."""
    return max(multiple, int(round(value / multiple)) * multiple)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image → normalised ``(3, H, W)`` float tensor with H, W multiples of the patch size.

    Modes:
      - ``"square"``: resize to ``size × size`` (``size`` rounded to a multiple of the patch);
      - ``"aspect"``: keep the aspect ratio; if ``size`` is given, scale so the shorter side is
        ``size``; then resize each side to its nearest multiple of the patch (TokenCut style).
    """

    mean: Sequence[float]
    std: Sequence[float]
    patch_size: int
    size: int | None = 224
    mode: str = "square"
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.mode not in ("square", "aspect"):
            raise ValueError(f"image mode must be 'square' or 'aspect', not {self.mode!r}")
        if self.resample not in RESAMPLING:
            raise ValueError(f"resample must be one of {sorted(RESAMPLING)}, not {self.resample!r}")
        if self.mode == "square" and not self.size:
            raise ValueError("square mode needs an image size")

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image is resized to."""
        p = self.patch_size
        if self.mode == "square":
            side = round_to_multiple(self.size, p)
            return side, side
        if self.size:
            scale = self.size / min(width, height)
            width, height = width * scale, height * scale
        return round_to_multiple(width, p), round_to_multiple(height, p)

    def __call__(self, image: Image.Image) -> Tensor:
        size = self.output_size(*image.size)
        if size != image.size:
            image = image.resize(size, RESAMPLING[self.resample])
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (tensor - mean) / std

    @classmethod
    def for_backbone(cls, backbone, size: int | None = None, mode: str = "square", resample: str = "bicubic"):
        """The transform a backbone expects (its mean/std/patch size); ``size`` defaults to the
        backbone's training resolution."""
        return cls(
            mean=backbone.image_mean,
            std=backbone.image_std,
            patch_size=backbone.patch_size,
            size=size if size is not None else (backbone.image_size if mode == "square" else None),
            mode=mode,
            resample=resample,
        )


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a list of files, transformed; unreadable files yield ``None`` and are named in
    :attr:`skipped` (main process) and by a warning."""

    def __init__(self, files: Sequence[Path], transform: ImageTransform) -> None:
        self.files = list(files)
        self.transform = transform
        self.skipped: list[Path] = []

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_image(self.files[index])), index
        except ImageReadError as err:
            warnings.warn(str(err), stacklevel=2)
            return None


def collate_skipping(batch):
    """Collate ``(tensor, index)`` pairs, dropping ``None`` (unreadable) items.

    Returns ``(pixels or None, indices)``; ``pixels`` is ``None`` when every item failed.
    Items of different sizes cannot be stacked: use batch size 1 or a square transform.
    """
    good = [item for item in batch if item is not None]
    if not good:
        return None, torch.zeros(0, dtype=torch.long)
    pixels = torch.stack([item[0] for item in good])
    return pixels, torch.tensor([item[1] for item in good], dtype=torch.long)
