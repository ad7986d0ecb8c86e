"""Webdataset-style tar shards (``KEY.jpg`` + ``KEY.cls``), e.g. ``../shared/data/tiny-imagenet``.

:func:`load_labelled_shards` decodes every sample of a split into one uint8 tensor in memory,
which is what training and probing on small datasets want (30,000 Tiny-ImageNet images are
about 370 MB).
"""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import DataFolderError


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
    """All samples of ``split``: images ``(N, 3, H, W)`` uint8 and labels ``(N,)`` int64.

    Images are resized to ``size × size`` when given (they must share one size otherwise).
    Samples whose image cannot be decoded or that lack a label are skipped with one warning.
    """
    images: list[np.ndarray] = []
    labels: list[int] = []
    bad: list[str] = []
    for shard in shard_files(folder, split):
        pending: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                pending.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        for key, parts in pending.items():
            img_bytes = parts.get("jpg") or parts.get("jpeg") or parts.get("png")
            if img_bytes is None or "cls" not in parts:
                bad.append(f"{shard.name}:{key}")
                continue
            try:
                with Image.open(io.BytesIO(img_bytes)) as img:
                    img = img.convert("RGB")
                    if size is not None and img.size != (size, size):
                        img = img.resize((size, size), Image.Resampling.BICUBIC)
                    images.append(np.asarray(img, dtype=np.uint8))
                labels.append(int(parts["cls"].decode().strip()))
            except (OSError, ValueError) as err:
                bad.append(f"{shard.name}:{key} ({err})")
            if limit and len(labels) >= limit:
                break
        if limit and len(labels) >= limit:
            break
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable sample(s): {', '.join(bad[:5])}", stacklevel=2)
    if not images:
        raise DataFolderError(f"no readable samples in the '{split}' shards of {folder}")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return stacked, torch.tensor(labels, dtype=torch.long)
