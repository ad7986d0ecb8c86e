"""Salient-object datasets: an image folder and a mask folder matched by file stem.

Covers the usual layouts: ECSSD (``images/`` + ``masks/``, or TokenCut's ``img/`` + ``gt/``),
DUTS-TE (``DUTS-TE-Image/`` + ``DUTS-TE-Mask/``), DUT-OMRON (``DUT-OMRON-image/`` +
``pixelwiseGT-new-PNG/``). Images without a mask are listed in :attr:`SaliencyDataset.missing`
and left out; a mask whose size differs from its image is resized with nearest neighbour and
named in a warning. A mask that looks like a photo (:func:`~soapvit.data.images.photo_reason`)
is refused: the first one when the dataset is opened, before any work (the image folder given as
``--masks``), any later one as that image's read error (the run lists it as skipped, with the
reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import DataFolderError, check_first_annotation, list_images, read_annotation
from .sources import AnnotatedImages

MASK_FOLDER_NAMES = ("masks", "gt", "GT", "ground_truth", "DUTS-TE-Mask", "pixelwiseGT-new-PNG", "mask")


@dataclass(frozen=True)
class SalientSample:
    stem: str
    image: Path
    mask: Path


def guess_mask_folder(images: Path) -> Path:
    """The sibling mask folder of an image folder, by the layouts above."""
    for name in MASK_FOLDER_NAMES:
        candidate = images.parent / name
        if candidate.is_dir() and candidate.resolve() != images.resolve():
            return candidate
    raise DataFolderError(
        f"--masks: no mask folder next to {images} (looked for {', '.join(MASK_FOLDER_NAMES)}); pass --masks DIR"
    )


@dataclass
class SaliencyDataset(AnnotatedImages):
    """Image/mask pairs of two folders, sorted by stem."""

    samples: list[SalientSample]
    missing: list[Path] = field(default_factory=list)
    """images that have no mask"""

    @classmethod
    def from_folders(cls, images: str | Path, masks: str | Path | None = None, limit: int | None = None):
        images = Path(images)
        image_files = list_images(images, what="--images")
        masks = Path(masks) if masks is not None else guess_mask_folder(images)
        by_stem = {p.stem: p for p in list_images(masks, what="--masks")}
        samples, missing = [], []
        for path in image_files:
            if path.stem in by_stem:
                samples.append(SalientSample(path.stem, path, by_stem[path.stem]))
            else:
                missing.append(path)
        if not samples:
            raise DataFolderError(f"--masks: no mask in {masks} has the stem of an image in {images}")
        check_first_annotation(samples[0].mask, load_mask, "--masks")
        return cls(samples[:limit] if limit else samples, missing)

    def load_target(self, sample: SalientSample, size: tuple[int, int]) -> np.ndarray:
        """The bool mask at the image's size."""
        return load_mask(sample.mask, size=size)


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask as bool ``(H, W)`` (any non-zero pixel is foreground); if ``size = (W, H)``
    differs, resize with nearest neighbour and warn naming the file."""
    mask = read_annotation(path, size, kind="mask")
    if mask.mode not in ("1", "L", "I", "I;16", "F"):
        mask = mask.convert("L")
    return np.asarray(mask) != 0
