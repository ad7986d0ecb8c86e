"""The token pipeline: the one way from an image source to tokens, shared by every job.

:func:`iter_tokens` takes any :class:`~soapvit.data.sources.ImageSource`, groups its items by
model-input size, decodes them in a :class:`~torch.utils.data.DataLoader` (workers on GPU),
encodes each batch once and yields the original features and, when a SOAP head is given, the
corrected ones. The head is applied by the one rule of :class:`~soapvit.soap.SoapBackbone`: at the
last block it transforms the output (no second forward pass); at an earlier block it is inserted
into the forward pass so every later block sees the corrected tokens. Unreadable items and
reader warnings are recorded once in a :class:`~soapvit.runlog.RunLog`; nothing stops the run.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .backbones.base import Backbone, Features
from .data.sources import ImageSource
from .data.transforms import ImageTransform
from .errors import SoapvitError
from .runlog import Progress, RunLog
from .soap import SoapHead, attach


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → CUDA if available, else CPU; otherwise the named device."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise SoapvitError(f"--device: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SoapvitError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise SoapvitError(f"--device {device}: only cpu and cuda devices are supported")
    return dev


def default_workers(device: torch.device) -> int:
    """Image-decoding workers: none on CPU (they would compete with the model), up to 8 on GPU."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA, nothing elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode(backbone: Backbone, pixels: Tensor, blocks=None, **kwargs) -> Features:
    """One no-grad forward pass with autocast; outputs are returned in float32."""
    with autocast(pixels.device):
        feats = backbone.forward_features(pixels, blocks, **kwargs)
    feats.tokens = {b: t.float() for b, t in feats.tokens.items()}
    feats.prefix = {b: t.float() for b, t in feats.prefix.items()}
    if feats.keys is not None:
        feats.keys = feats.keys.float()
    feats.attentions = {b: a.float() for b, a in feats.attentions.items()}
    return feats


@dataclass
class TokenBatch:
    """One encoded batch: source indices, targets, optionally the decoded images, the original
    features and, with a head, the SOAP-corrected ones."""

    indices: list[int]
    targets: list[Any]
    images: list[Any] | None
    pixels: Tensor
    original: Features
    corrected: Features | None

    def variants(self) -> dict[str, Features]:
        """``{"original": …, "soap": …}`` (``soap`` only with a head)."""
        return {"original": self.original} | ({"soap": self.corrected} if self.corrected is not None else {})


@dataclass
class _Item:
    index: int
    pixels: Tensor | None = None
    target: Any = None
    image: Any = None
    error: str | None = None
    notes: tuple[str, ...] = ()


class _Decoded(torch.utils.data.Dataset):
    """Items of a source, decoded and transformed; failures come back as ``_Item.error``."""

    def __init__(self, source: ImageSource, transform: ImageTransform, keep_images: bool) -> None:
        self.source, self.transform, self.keep_images = source, transform, keep_images

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> _Item:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                image, target = self.source.load(index)
                pixels = self.transform(image)
            except SoapvitError as err:
                return _Item(index, error=str(err), notes=tuple(str(w.message) for w in caught))
        return _Item(index, pixels, target, image if self.keep_images else None,
                     notes=tuple(str(w.message) for w in caught))


def plan_batches(source: ImageSource, transform: ImageTransform, indices: Iterable[int], batch_size: int,
                 log: RunLog) -> list[list[int]]:
    """Batches of items that share one model-input size (square resizing: one size, no header
    reads), in source order within each size; items whose header cannot be read are logged."""
    indices = list(indices)
    if transform.mode == "square":
        groups = {None: indices}
    else:
        groups = {}
        for i in indices:
            try:
                size = transform.output_size(*source.image_size(i))
            except SoapvitError as err:
                log.skip(source.name(i), str(err))
                continue
            groups.setdefault(size, []).append(i)
    return [group[s : s + batch_size] for group in groups.values() for s in range(0, len(group), batch_size)]


def iter_tokens(
    backbone: Backbone,
    source: ImageSource,
    image_transform: ImageTransform,
    *,
    blocks: int | str | Sequence[int] = "last",
    head: SoapHead | None = None,
    norm: bool = True,
    keys: bool = False,
    attentions: int | str | Sequence[int] = (),
    indices: Iterable[int] | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    keep_images: bool = False,
    log: RunLog | None = None,
    progress: Progress | None = None,
    stage: str = "encoding",
) -> Iterator[TokenBatch]:
    """Encode ``source`` (or its ``indices``) batch by batch; see the module doc."""
    if batch_size < 1:
        raise SoapvitError(f"--batch-size must be at least 1, not {batch_size}")
    device = backbone.device
    log = log if log is not None else RunLog()
    corrected_backbone = None
    if head is not None:
        head.check_backbone(backbone, allow_other=True)
        if head.apply_block != backbone.num_blocks - 1:
            corrected_backbone = attach(backbone, head)
    indices = range(len(source)) if indices is None else list(indices)
    batches = plan_batches(source, image_transform, indices, batch_size, log)
    workers = default_workers(device) if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        _Decoded(source, image_transform, keep_images), batch_sampler=batches, collate_fn=list,
        num_workers=workers, pin_memory=device.type == "cuda",
    )
    options = dict(norm=norm, keys=keys, attentions=attentions)
    total = len(indices)
    done = total - sum(map(len, batches))
    for items in loader:
        by_shape: dict[tuple[int, ...], list[_Item]] = {}
        for item in items:
            for note in item.notes:
                log.warn(note)
            if item.error is not None:
                log.skip(source.name(item.index), item.error)
            else:
                by_shape.setdefault(tuple(item.pixels.shape), []).append(item)
        for group in by_shape.values():
            pixels = torch.stack([item.pixels for item in group]).to(device, non_blocking=True)
            original = encode(backbone, pixels, blocks, **options)
            if head is None:
                corrected = None
            elif corrected_backbone is None:
                corrected = head.correct(original)
            else:
                corrected = encode(corrected_backbone, pixels, blocks, **options)
            yield TokenBatch([item.index for item in group], [item.target for item in group],
                             [item.image for item in group] if keep_images else None, pixels, original, corrected)
        done += len(items)
        if progress:
            progress(stage, done, total)
