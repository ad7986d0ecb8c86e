"""Frozen-backbone features of a labelled image set, computed once and cached on disk.

Per image (and per augmentation view) the cache keeps the chosen block's prefix tokens
``(P, D)`` and patch tokens ``(N, D)`` in float16. It is a folder named by a key that hashes
everything the tokens depend on: model id, a digest of the backbone's weights, image size, block,
final norm, views and their seed, the data selection, and the SOAP head file when the head
changes the cached tokens (a head applied at an earlier block). Parts of ``part_size`` images are
written as they finish, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..backbones.base import Backbone
from ..features import encode
from .datasets import LabelledImages, random_resized_flip, to_pixels

CACHE_FORMAT = "soapvit-probe-cache/1"
Progress = Callable[[str, int, int], None]


@dataclass
class TokenCache:
    """Cached tokens: ``prefix (N·V, P, D)``, ``patches (N·V, n, D)`` float16 (row ``i·V + v`` is
    view ``v`` of image ``i``; view 0 is the plain image), ``labels (N,)``."""

    prefix: Tensor
    patches: Tensor
    labels: Tensor
    views: int
    grid: tuple[int, int]
    meta: dict

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def plain(self) -> TokenCache:
        """Only view 0 of every image."""
        rows = torch.arange(len(self)) * self.views
        return TokenCache(self.prefix[rows], self.patches[rows], self.labels, 1, self.grid, self.meta)

    def with_patches(self, patches: Tensor) -> TokenCache:
        return TokenCache(self.prefix, patches, self.labels, self.views, self.grid, self.meta)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 prefix of every parameter and buffer (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cache_key(backbone: Backbone, data: LabelledImages, *, image_size: int, block: int, norm: bool, views: int,
              seed: int, head_digest: str | None) -> dict:
    """Everything the cached tokens depend on (the folder name is its hash)."""
    return {"format": CACHE_FORMAT, "model_id": backbone.model_id, "weights": weights_digest(backbone),
            "image_size": image_size, "block": block, "norm": norm, "views": views,
            "seed": seed if views > 1 else None, "data": data.fingerprint(), "head": head_digest}


def encode_images(backbone: Backbone, data: LabelledImages, *, image_size: int, block: int = -1, norm: bool = True,
                  views: int = 1, seed: int = 0, batch_size: int = 64, cache_dir: str | Path | None = None,
                  head_digest: str | None = None, part_size: int = 1024, label: str = "encoding",
                  progress: Progress | None = None) -> TokenCache:
    """Tokens of ``block`` for every image of ``data`` (``views − 1`` augmented views each), read
    from ``cache_dir`` when present, else computed (and written there part by part).

    ``head_digest`` names a SOAP head that ``backbone`` already applies before ``block``; leave
    it None otherwise. ``meta["encode_seconds"]`` is the time spent encoding in this call.
    """
    block = backbone.resolve_blocks(block)[0]
    key = cache_key(backbone, data, image_size=image_size, block=block, norm=norm, views=views, seed=seed,
                    head_digest=head_digest)
    folder = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        folder = Path(cache_dir) / digest
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
    device = backbone.device
    n = len(data)
    parts: list[dict[str, Tensor]] = []
    encode_seconds = 0.0
    hits = 0
    for part, start in enumerate(range(0, n, part_size)):
        stop = min(n, start + part_size)
        path = folder / f"part-{part:05d}.safetensors" if folder is not None else None
        if path is not None and path.is_file():
            parts.append(load_file(str(path)))
            hits += 1
        else:
            t0 = time.perf_counter()
            parts.append(_encode_part(backbone, data.images[start:stop], start, image_size=image_size, block=block,
                                      norm=norm, views=views, seed=seed, batch_size=batch_size, device=device,
                                      progress=progress, total=n, label=label))
            encode_seconds += time.perf_counter() - t0
            if path is not None:
                save_file(parts[-1], str(path.with_suffix(".tmp")))
                path.with_suffix(".tmp").rename(path)
        if progress:
            progress(label, stop, n)
    prefix = torch.cat([p["prefix"] for p in parts])
    patches = torch.cat([p["patches"] for p in parts])
    side = image_size // backbone.patch_size
    meta = dict(key, encode_seconds=encode_seconds, parts_from_cache=hits, parts=len(parts),
                folder=str(folder) if folder else None)
    return TokenCache(prefix, patches, data.labels.clone(), views, (side, side), meta)


def _encode_part(backbone, images, offset, *, image_size, block, norm, views, seed, batch_size, device, progress,
                 total, label) -> dict[str, Tensor]:
    prefix, patches = [], []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        # one generator per batch: the views do not depend on how the data was split into parts
        generator = torch.Generator().manual_seed(seed * 1_000_003 + offset + start)
        stacked = [batch] + [random_resized_flip(batch, generator) for _ in range(views - 1)]
        stacked = torch.stack(stacked, dim=1).flatten(0, 1)  # image-major: row i·V + v
        pixels = to_pixels(stacked, image_size, backbone.image_mean, backbone.image_std).to(device)
        feats = encode(backbone, pixels, block, norm=norm)
        prefix.append(feats.prefix[block].half().cpu())
        patches.append(feats.tokens[block].flatten(1, 2).half().cpu())
        if progress:
            progress(label, offset + start + batch.shape[0], total)
    return {"prefix": torch.cat(prefix).contiguous(), "patches": torch.cat(patches).contiguous()}
