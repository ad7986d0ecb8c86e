"""Frozen-backbone features of a labelled image set, computed once and cached on disk.

Per image (and per augmentation view) the cache keeps the chosen block's prefix tokens
``(P, D)`` and patch tokens ``(N, D)`` in float16. It is a folder named by a key that hashes
everything the tokens depend on: model id, a digest of the backbone's weights, image size, block,
final norm, views and their seed, the data selection, and the corrections that change the cached
tokens (those in the forward pass, by the head rule). Parts of ``part_size`` images are written as
they finish (atomically), so an interrupted run resumes where it stopped. Under torchrun each
process encodes its share of a part, every rank receives the whole part, rank 0 writes it.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .. import distributed
from ..backbones.base import Backbone
from ..data.labelled import LabelledImages
from ..data.sources import AugmentedViews
from ..data.transforms import ImageTransform
from ..errors import SoapvitError
from ..features import iter_tokens
from ..io import save_safetensors, write_json
from ..runlog import Progress
from ..safetensors_io import read_safetensors

CACHE_FORMAT = "soapvit-probe-cache/2"


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


def cache_key(backbone: Backbone, data: LabelledImages, *, image_size: int, block: int, norm: bool, views: int,
              seed: int, inside: Mapping) -> dict:
    """Everything the cached tokens depend on (the folder name is its hash)."""
    return {"format": CACHE_FORMAT, "model_id": backbone.model_id, "weights": backbone.weights_digest(),
            "image_size": image_size, "block": block, "norm": norm, "views": views,
            "seed": seed if views > 1 else None, "data": data.fingerprint(),
            "corrections": {name: c.digest() for name, c in inside.items()} or None}


def encode_images(backbone: Backbone, data: LabelledImages, *, image_size: int, block: int = -1, norm: bool = True,
                  views: int = 1, seed: int = 0, corrections: Mapping | None = None, batch_size: int = 64,
                  cache_dir: str | Path | None = None, part_size: int = 1024, stage: str = "encoding",
                  num_workers: int | None = None, progress: Progress | None = None) -> dict[str, TokenCache]:
    """Tokens of ``block`` for every image of ``data`` (``views − 1`` augmented views each), read
    from ``cache_dir`` when present, else computed through the token pipeline (and written there
    part by part). Returns ``{"original": …}`` plus one cache per correction;
    ``meta["encode_seconds"]`` is the time spent encoding in this call.

    A correction that maps the output at ``block`` is computed from the original cache (shared with
    runs without corrections). The others change the tokens inside the forward pass: they come from
    one pass with the original and are cached under a key that includes their digests.
    """
    block = backbone.resolve_blocks(block)[0]
    corrections = dict(corrections or {})
    after = {n: c for n, c in corrections.items() if c.maps_output(backbone) and c.block_ == block}
    inside = {n: c for n, c in corrections.items() if n not in after}
    key = cache_key(backbone, data, image_size=image_size, block=block, norm=norm, views=views, seed=seed,
                    inside=inside)
    folder, save = None, False
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        folder = Path(cache_dir) / digest
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SoapvitError(f"cannot use the feature cache folder {cache_dir}: {err.strerror or err} "
                               "(give another --cache-dir, or --no-cache)") from None
        save = _record_key(folder / "key.json", key)
    source = AugmentedViews(data, views, seed)
    transform = ImageTransform.for_backbone(backbone, size=image_size, mode="square")
    n = len(data)
    parts: list[dict[str, Tensor]] = []
    encode_seconds, hits = 0.0, 0
    for part, start in enumerate(range(0, n, part_size)):
        stop = min(n, start + part_size)
        path = folder / f"part-{part:05d}.safetensors" if folder is not None else None
        expected = {f"{v}.{kind}": (stop - start) * views for v in ["original", *inside] for kind in ("prefix", "patches")}
        cached = _read_part(path, expected) if path is not None and path.is_file() else None
        if cached is not None:
            parts.append(cached)
            hits += 1
        else:
            t0 = time.perf_counter()
            rows: list[tuple[int, dict[str, Tensor]]] = []
            for batch in iter_tokens(backbone, source, transform, blocks=block, corrections=inside, norm=norm,
                                     indices=range(start * views, stop * views), batch_size=batch_size,
                                     num_workers=num_workers, across_ranks=True):
                encoded = {}
                for variant, feats in batch.variants.items():
                    encoded[f"{variant}.prefix"] = feats.prefix[block].half().cpu()
                    encoded[f"{variant}.patches"] = feats.tokens[block].flatten(1, 2).half().cpu()
                rows += [(index, {k: v[i].clone() for k, v in encoded.items()})
                         for i, index in enumerate(batch.indices)]
            ordered = distributed.gather_by_index(rows)
            parts.append({k: torch.stack([row[k] for row in ordered]).contiguous() for k in ordered[0]})
            encode_seconds += time.perf_counter() - t0
            if path is not None and save and distributed.is_main():
                try:
                    save_safetensors(parts[-1], path, what="probe cache part")
                except SoapvitError as err:  # a read-only cache: the run goes on, its features unsaved
                    warnings.warn(f"{err}; the remaining parts are encoded without saving", stacklevel=2)
                    save = False
        if progress:
            progress(stage, stop, n)
    side = image_size // backbone.patch_size
    meta = dict(key, encode_seconds=encode_seconds, parts_from_cache=hits, parts=len(parts),
                folder=str(folder) if folder else None)
    caches = {v: TokenCache(torch.cat([p[f"{v}.prefix"] for p in parts]), torch.cat([p[f"{v}.patches"] for p in parts]),
                            data.labels.clone(), views, (side, side), meta) for v in ["original", *inside]}
    for name, correction in after.items():
        correction.prepare(backbone)
        caches[name] = corrected(caches["original"], correction)
    return {name: caches[name] for name in ["original", *corrections]}


def _record_key(path: Path, key: dict) -> bool:
    """Write the cache key beside the parts, unless the same key is there already (a read-only cache
    that holds every part is read, not written); False, with a warning, when it cannot be written."""
    try:
        if json.loads(path.read_text()) == json.loads(json.dumps(key, sort_keys=True)):
            return True
    except (OSError, ValueError):
        pass
    try:
        write_json(path, key, "probe cache key", sort_keys=True)
    except SoapvitError as err:
        warnings.warn(f"{err}: the cache is read, new parts are not saved", stacklevel=3)
        return False
    return True


def _read_part(path: Path, expected: Mapping[str, int]) -> dict[str, Tensor] | None:
    """A cached part, or None (with a warning) when the file is damaged (unreadable, a tensor
    missing, fewer or more rows than ``expected`` (name → rows), rows of unequal width, NaN or
    inf values): it is encoded again."""
    try:
        part = read_safetensors(path, "probe cache part")[0]
        reason = part_damage(part, expected)
    except SoapvitError as err:
        part, reason = None, str(err)
    if reason is None:
        return part
    warnings.warn(f"damaged probe cache part {path}: {reason}; encoding it again", stacklevel=3)
    return None


def part_damage(part: Mapping[str, Tensor], expected: Mapping[str, int]) -> str | None:
    """Why a cache part cannot be used, or None."""
    missing = [k for k in expected if k not in part]
    if missing:
        return f"it lacks {', '.join(missing)}"
    widths = set()
    for key, rows in expected.items():
        value = part[key]
        if value.ndim != 3 or value.shape[0] != rows:
            return f"{key} has shape {list(value.shape)}, not {rows} rows of tokens"
        widths.add(value.shape[-1])
        if not bool(torch.isfinite(value).all()):
            return f"{key} holds NaN or inf values"
    if len(widths) > 1:
        return f"its tensors have different widths {sorted(widths)}"
    return None


def corrected(cache: TokenCache, correction, chunk: int = 2048) -> TokenCache:
    """The cache with ``correction.transform`` applied to every image's patch grid (float32 math,
    float16 out)."""
    patches = torch.empty_like(cache.patches)
    h, w = cache.grid
    for start in range(0, patches.shape[0], chunk):
        rows = cache.patches[start : start + chunk].float()
        patches[start : start + chunk] = correction.transform(rows.reshape(-1, h, w, rows.shape[-1])).reshape(
            rows.shape).half()
    return cache.with_patches(patches)
