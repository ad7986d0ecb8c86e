"""Image sources: the one small protocol every dataset offers the token pipeline.

A source is indexable: :meth:`~ImageSource.name` names item ``i`` in messages,
:meth:`~ImageSource.image_size` gives its ``(width, height)`` cheaply (file header), and
:meth:`~ImageSource.load` decodes it as ``(image, target)`` where the image is a PIL image or a
uint8 tensor ``(3, H, W)`` and the target is whatever the job scores against (a saliency mask, a
label map, a class index, or ``None``). ``load`` raises :class:`~soapvit.errors.SoapvitError`
naming the file when an item cannot be read; the pipeline records it and moves on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor

from .augment import random_resized_flip
from .images import ImageReadError, load_image
from .labelled import LabelledImages

EXIF_ORIENTATION = 0x0112
SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90°


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...

    def image_size(self, index: int) -> tuple[int, int]: ...

    def load(self, index: int) -> tuple[Image.Image | Tensor, Any]: ...


def header_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file as displayed (EXIF rotation applied), from its header."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(EXIF_ORIENTATION) in SWAPPED_ORIENTATIONS:
                width, height = height, width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err
    return width, height


@dataclass
class ImageFiles:
    """A list of image files without targets."""

    files: Sequence[Path]

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return str(self.files[index])

    def image_size(self, index: int) -> tuple[int, int]:
        return header_size(self.files[index])

    def load(self, index: int) -> tuple[Image.Image, None]:
        return load_image(self.files[index]), None


@dataclass
class AugmentedViews:
    """``views`` items per image of a uint8 source: view 0 is the image itself, views 1… are random
    resized crops with flips, seeded per image and view (independent of batching and workers).
    Item ``i·views + v`` is view ``v`` of image ``i``."""

    source: LabelledImages
    views: int
    seed: int = 0

    def __len__(self) -> int:
        return len(self.source) * self.views

    def name(self, index: int) -> str:
        return self.source.name(index // self.views)

    def image_size(self, index: int) -> tuple[int, int]:
        return self.source.image_size(index // self.views)

    def load(self, index: int) -> tuple[Tensor, Any]:
        image_index, view = divmod(index, self.views)
        image, target = self.source.load(image_index)
        if view:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + image_index) * 1_009 + view)
            image = random_resized_flip(image[None], generator)[0]
        return image, target
