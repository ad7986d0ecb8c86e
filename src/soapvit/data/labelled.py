"""Labelled image sets (probes, attention statistics), held in memory as uint8.

A data argument is ``DIR`` or ``DIR:SPLIT`` and resolves, in this order, to
  1. webdataset tar shards ``DIR/SPLIT-*.tar[.gz]`` (``KEY.jpg`` + ``KEY.cls``, the Tiny-ImageNet
     layout of ``../shared/data/tiny-imagenet``); ``SPLIT`` defaults to the caller's split name;
  2. an ImageFolder: one sub-folder of images per class in ``DIR/SPLIT`` if that exists, else in
     ``DIR`` (classes numbered in sorted folder-name order);
  3. a flat folder of images (unlabelled, label −1): enough for attention statistics.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .images import IMAGE_EXTENSIONS, DataFolderError, ImageReadError, list_images, load_image
from .shards import load_labelled_shards, shard_files


@dataclass
class LabelledImages:
    """Images ``(N, 3, H, W)`` uint8 held in memory, labels ``(N,)`` int64 (−1: unlabelled) and
    where they came from."""

    images: Tensor
    labels: Tensor
    identity: dict
    """Plain data naming the source and selection (part of feature-cache keys)."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]

    def name(self, index: int) -> str:
        return f"{self.identity.get('kind', 'images')}[{index}]"

    def image_size(self, index: int) -> tuple[int, int]:
        return int(self.images.shape[-1]), int(self.images.shape[-2])

    def load(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def parse_spec(spec: str | Path, default_split: str) -> tuple[Path, str, bool]:
    """``DIR`` or ``DIR:SPLIT`` → (folder, split, whether the split was given)."""
    text = str(spec)
    folder, sep, split = text.rpartition(":")
    if sep and folder and split and "/" not in split and Path(folder).is_dir():
        return Path(folder), split, True
    return Path(text), default_split, False


def _file_identity(paths: list[Path]) -> list[list]:
    return [[str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)] for p in paths]


def select_per_class(labels: Tensor, per_class: int | None, limit: int | None) -> Tensor:
    """Indices of the first ``per_class`` samples of every class (in order), then the first ``limit``."""
    index = torch.arange(labels.shape[0])
    if per_class:
        keep = torch.zeros_like(labels, dtype=torch.bool)
        for c in labels.unique():
            keep[(labels == c).nonzero().flatten()[:per_class]] = True
        index = index[keep]
    return index[:limit] if limit else index


def load_labelled(spec: str | Path, split: str, *, size: int | None = None, per_class: int | None = None,
                  limit: int | None = None, what: str = "--train") -> LabelledImages:
    """Read a data argument (see the module doc). ``size`` resizes every image to ``size²`` at read
    time (needed for folders of mixed sizes); shards keep their stored size if ``size`` is None."""
    folder, split, explicit = parse_spec(spec, split)
    if not folder.is_dir():
        raise DataFolderError(f"{what}: folder {folder} does not exist")
    selection = {"per_class": per_class, "limit": limit, "size": size}
    if any(folder.glob(f"{split}-*.tar*")) or any(folder.glob("*.tar*")):
        shards = shard_files(folder, split, what=what)
        images, labels = load_labelled_shards(folder, split, size=size)
        identity = {"kind": "shards", "split": split, "files": _file_identity(shards), **selection}
    else:
        root = folder / split if (folder / split).is_dir() else folder
        if explicit and root == folder:
            raise DataFolderError(f"{what}: {folder} has neither '{split}-*.tar' shards nor a '{split}' sub-folder")
        classes = sorted(p for p in root.iterdir() if p.is_dir() and _has_images(p))
        if classes:
            files = [(f, c) for c, d in enumerate(classes) for f in list_images(d, what=what)]
        else:
            files = [(f, -1) for f in list_images(root, what=what)]
        images, labels = _read_files(files, size, what)
        identity = {"kind": "folder" if classes else "flat", "files": _file_identity([f for f, _ in files]),
                    "classes": [c.name for c in classes], **selection}
    index = select_per_class(labels, per_class, limit)
    return LabelledImages(images[index], labels[index], identity)


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def _read_files(files: list[tuple[Path, int]], size: int | None, what: str) -> tuple[Tensor, Tensor]:
    arrays, labels, bad = [], [], []
    for path, label in files:
        try:
            image = load_image(path)
        except ImageReadError:
            bad.append(path)
            continue
        if size is not None:
            image = image.resize((size, size), resample=3)  # bicubic
        arrays.append(np.asarray(image, dtype=np.uint8))
        labels.append(label)
    if bad:
        warnings.warn(f"{what}: skipped {len(bad)} unreadable image(s): {', '.join(map(str, bad[:5]))}", stacklevel=3)
    if not arrays:
        raise DataFolderError(f"{what}: no readable images")
    if len({a.shape for a in arrays}) > 1:
        raise DataFolderError(f"{what}: images have different sizes; pass an image size to resize them")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)
