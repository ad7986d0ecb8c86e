"""Webdataset-style tar shards (``KEY.jpg`` + ``KEY.cls``), e.g. ``../shared/data/tiny-imagenet``.

:func:`load_labelled_shards` decodes every sample of a split into one uint8 tensor in memory,
which is what training and probing on small datasets want (30,000 Tiny-ImageNet images are
about 370 MB). A sample is kept only when both its label and its image are readable, so a bad
sample never shifts the labels of the others; skipped samples are named in one warning.
"""

from __future__ import annotations

import io
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import DataFolderError, ImageReadError, load_image

IMAGE_PARTS = ("jpg", "jpeg", "png")
LABEL_PART = "cls"
SHOWN_SKIPS = 5
MAX_MEMBER_BYTES = 256 * 2**20
"""Most bytes one tar member may hold: a larger one is skipped with its sample, unread (a gzip bomb
in a small shard never reaches memory)."""


def shard_files(folder: str | Path, split: str, *, what: str = "--data") -> list[Path]:
    """``<split>-*.tar`` / ``.tar.gz`` shards inside ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFolderError(f"{what}: folder {folder} does not exist")
    files = sorted(p for p in folder.glob(f"{split}-*.tar*") if p.name.endswith((".tar", ".tar.gz", ".tgz")))
    if not files:
        raise DataFolderError(f"{what}: no '{split}-*.tar[.gz]' shards in {folder}")
    return files


def load_labelled_shards(
    folder: str | Path, split: str, *, size: int | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` (default: all) readable samples of ``split``: images ``(N, 3, H, W)``
    uint8 and labels ``(N,)`` int64.

    Images are resized to ``size × size`` when given; otherwise they must share one size.
    A sample without a non-negative integer label or a decodable image is skipped; a damaged
    archive keeps the samples before the damage. Both are named in one warning.
    """
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[str] = []
    for name, parts in _samples(shard_files(folder, split), skipped):
        try:
            label = _label(parts)
            image = _image(parts, name, size)
        except ImageReadError as err:
            skipped.append(str(err))
            continue
        except ValueError as err:
            skipped.append(f"{name}: {err}")
            continue
        if images and image.shape != images[0].shape:
            raise DataFolderError(f"sample {name} is {image.shape[1]}x{image.shape[0]} but the first of '{split}' in "
                                  f"{folder} is {images[0].shape[1]}x{images[0].shape[0]}: give an image size")
        images.append(image)
        labels.append(label)
        if limit and len(labels) >= limit:
            break
    if skipped:
        more = f" and {len(skipped) - SHOWN_SKIPS} more" if len(skipped) > SHOWN_SKIPS else ""
        warnings.warn(f"skipped {len(skipped)} unreadable sample(s) of the '{split}' shards in {folder}: "
                      f"{'; '.join(skipped[:SHOWN_SKIPS])}{more}", stacklevel=2)
    if not images:
        raise DataFolderError(f"no readable samples in the '{split}' shards of {folder}")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return stacked, torch.tensor(labels, dtype=torch.long)


def _samples(shards: list[Path], skipped: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``("shard:key", {extension: bytes})`` of every sample, shard by shard."""
    for shard in shards:
        for key, parts in _read_shard(shard, skipped):
            yield f"{shard.name}:{key}", parts


def _read_shard(shard: Path, skipped: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one shard as they are read (a sample's members are consecutive, as in
    webdataset); a damaged archive ends with the last complete sample before the damage. A sample
    with a member larger than :data:`MAX_MEMBER_BYTES` is skipped, the member named in ``skipped``."""
    key, parts, count, oversized = None, {}, 0, False
    try:
        with tarfile.open(shard, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name, _, ext = member.name.rpartition(".")
                if name != key:
                    if parts and not oversized:
                        yield key, parts
                        count += 1
                    parts, oversized = {}, False
                key = name
                if member.size > MAX_MEMBER_BYTES:
                    skipped.append(f"{shard.name}:{member.name}: {member.size} bytes, more than "
                                   f"{MAX_MEMBER_BYTES} (MAX_MEMBER_BYTES): sample skipped unread")
                    oversized = True
                if not oversized:
                    parts[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        skipped.append(f"{shard.name}: unreadable after {count} samples ({err})")
        return
    if parts and not oversized:
        yield key, parts


def _label(parts: dict[str, bytes]) -> int:
    if LABEL_PART not in parts:
        raise ValueError(f"no .{LABEL_PART} label")
    text = parts[LABEL_PART].decode("utf-8", errors="replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise ValueError(f"label {text[:20]!r} is not an integer") from None
    if label < 0:
        raise ValueError(f"label {label} is negative")
    return label


def _image(parts: dict[str, bytes], name: str, size: int | None) -> np.ndarray:
    data = next((parts[ext] for ext in IMAGE_PARTS if ext in parts), None)
    if data is None:
        raise ValueError(f"no {'/'.join('.' + ext for ext in IMAGE_PARTS)} image")
    image = load_image(io.BytesIO(data), name=name)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)
