"""The token pipeline: the one way from an image source to tokens, shared by every job.

:func:`iter_tokens` takes any :class:`~soapvit.data.sources.ImageSource`, groups its items by
model-input size, decodes them in a :class:`~torch.utils.data.DataLoader` (workers on GPU),
encodes each batch once and yields named variants: ``original`` and one per correction given.
A correction that maps the output (the head rule of :mod:`soapvit.corrections.base`) is computed
from the original pass; one that edits the forward pass is encoded once more through the
backbone it wraps. The pipeline knows only the :class:`Correction` protocol, no method. Unreadable
items and reader warnings are recorded once in a :class:`~soapvit.runlog.RunLog`; nothing stops
the run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from . import distributed
from .backbones.base import Backbone, Features
from .data.sources import ImageSource, ImageStream, Loader, is_stream
from .data.transforms import ImageTransform
from .errors import SoapvitError
from .runlog import Progress, RunLog


class Correction(Protocol):
    """What the pipeline needs of a correction (:mod:`soapvit.corrections` implements it)."""

    def maps_output(self, backbone: Backbone) -> bool: ...

    def correct(self, features: Features) -> Features: ...

    def wrap(self, backbone: Backbone) -> Backbone: ...

    def prepare(self, backbone: Backbone) -> None: ...


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → CUDA if available, else CPU; otherwise the named device."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise SoapvitError(f"--device: {err}") from err
    if dev.type == "cuda" and dev.index is None and distributed.launched():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # under torchrun: one GPU per rank
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SoapvitError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise SoapvitError(f"--device {device}: only cpu and cuda devices are supported")
    return dev


def default_workers(device: torch.device) -> int:
    """Image-decoding workers: none on CPU (they would compete with the model), up to 8 on GPU."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


PRECISIONS = ("bf16", "fp32")
"""``--precision``: bf16 autocast on CUDA (the default) or plain float32 everywhere."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise SoapvitError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def autocast(device: torch.device, enabled: bool | str = True):
    """bf16 autocast on CUDA, nothing elsewhere; ``enabled`` is a bool or a precision name
    (``"fp32"`` turns autocast off)."""
    if isinstance(enabled, str):
        enabled = check_precision(enabled) == "bf16"
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(pixels: Tensor, device: torch.device) -> Tensor:
    """A decoded batch onto ``device``: pinned first when the copy goes to a GPU, so that it is
    asynchronous (the loader's own ``pin_memory`` cannot pin the list of items it collates)."""
    if device.type == "cuda" and not pixels.is_pinned():
        pixels = pixels.pin_memory()
    return pixels.to(device, non_blocking=True)


@torch.no_grad()
def encode(backbone: Backbone, pixels: Tensor, blocks=None, precision: str = "bf16", **kwargs) -> Features:
    """One no-grad forward pass, with bf16 autocast on CUDA unless ``precision="fp32"``; outputs
    are returned in float32."""
    with autocast(pixels.device, precision):
        feats = backbone.forward_features(pixels, blocks, **kwargs)
    feats.tokens = {b: t.float() for b, t in feats.tokens.items()}
    feats.prefix = {b: t.float() for b, t in feats.prefix.items()}
    if feats.keys is not None:
        feats.keys = feats.keys.float()
    feats.attentions = {b: a.float() for b, a in feats.attentions.items()}
    return feats


@dataclass
class TokenBatch:
    """One encoded batch: source indices, targets, optionally the decoded images, and the
    features of every variant (``"original"`` first, then one per correction). ``step`` numbers
    the loader batch it came from in this process's plan; ``ends_step`` is true on the last batch
    of that step (a step yields one batch per input shape), after which ``start_step=step + 1``
    resumes."""

    indices: list[int]
    targets: list[Any]
    images: list[Any] | None
    pixels: Tensor
    variants: dict[str, Features]
    step: int = 0
    ends_step: bool = True

    @property
    def original(self) -> Features:
        return self.variants["original"]


@dataclass
class _Item:
    index: int
    name: str
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
        return _decode(index, self.source.name(index), lambda: self.source.load(index), self.transform,
                       self.keep_images)


class _Streamed(torch.utils.data.IterableDataset):
    """The items of a stream that this process (``part`` of ``parts``) and, inside a DataLoader,
    this worker read, decoded and transformed."""

    def __init__(self, source: ImageStream, transform: ImageTransform, keep_images: bool, part: int,
                 parts: int) -> None:
        self.source, self.transform, self.keep_images = source, transform, keep_images
        self.part, self.parts = part, parts

    def __iter__(self) -> Iterator[_Item]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, name, load in self.source.stream(self.part * workers + worker, self.parts * workers):
            yield _decode(index, name, load, self.transform, self.keep_images)


def _decode(index: int, name: str, load: Loader, transform: ImageTransform, keep_images: bool) -> _Item:
    """One item decoded and transformed; a failure comes back as ``_Item.error``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image, target = load()
            pixels = transform(image)
        except SoapvitError as err:
            return _Item(index, name, error=str(err), notes=tuple(str(w.message) for w in caught))
    return _Item(index, name, pixels, target, image if keep_images else None,
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


def gather_log(log: RunLog) -> RunLog:
    """The run logs of every rank of a :mod:`torch.distributed` group, merged (each entry once, in
    the log's own order); the log itself in a single process."""
    if not distributed.active():
        return log
    merged = RunLog()
    for part in distributed.all_gather_objects(log):
        merged.merge(part.skipped, part.warnings)
    return merged


def _steps(source: ImageSource | ImageStream, transform: ImageTransform, indices: Iterable[int] | None,
           batch_size: int, workers: int, keep_images: bool, across_ranks: bool, start_step: int,
           pin_memory: bool, log: RunLog) -> tuple[Iterator[tuple[int, list[_Item]]], int, int]:
    """``(step, decoded items)`` of this process's loader batches from ``start_step`` on, the
    number of items it reads (for a stream: its share of the limit, 0 if unknown) and how many of
    them the skipped steps held. With ``across_ranks`` an indexable source's planned batches are
    dealt round-robin to the ranks (every rank encodes the same batches as one process would), a
    stream's items are split between the ranks' and workers' readers."""
    part, parts = (distributed.rank(), distributed.world_size()) if across_ranks else (0, 1)
    # the collated batch is a list of items, which the loader's pin_memory leaves unpinned: the
    # stacked pixels are pinned by the consumer (:func:`to_device`)
    options = dict(collate_fn=list, num_workers=workers, pin_memory=False)
    if is_stream(source):
        if indices is not None:
            raise ValueError("indices select items of an indexable source, not of a stream")
        loader = torch.utils.data.DataLoader(_Streamed(source, transform, keep_images, part, parts),
                                             batch_size=batch_size, **options)
        total = (source.limit or 0) // parts
        return itertools.islice(enumerate(loader), start_step, None), total, min(total, start_step * batch_size)
    indices = range(len(source)) if indices is None else list(indices)
    batches = distributed.share(plan_batches(source, transform, indices, batch_size, log), part, parts)
    loader = torch.utils.data.DataLoader(_Decoded(source, transform, keep_images),
                                         batch_sampler=batches[start_step:], **options)
    return enumerate(loader, start_step), sum(map(len, batches)), sum(map(len, batches[:start_step]))


def iter_pixels(source: ImageSource | ImageStream, transform: ImageTransform, indices: Iterable[int],
                batch_size: int, device: torch.device, *, num_workers: int | None = None,
                log: RunLog | None = None) -> Iterator[Tensor]:
    """Normalised pixels of ``indices`` (of a stream: as many first items), in batches of one
    input size on ``device``: the input of a calibration pass. Failures go to ``log``."""
    log = log if log is not None else RunLog()
    indices = list(indices)
    stream = is_stream(source)
    steps, _, _ = _steps(source, transform, None if stream else indices, batch_size,
                         default_workers(device) if num_workers is None else num_workers, False, False, 0,
                         device.type == "cuda", log)
    left = len(indices)
    for _, items in steps:
        by_shape: dict[tuple[int, ...], list[Tensor]] = {}
        for item in items[:left] if stream else items:
            if item.error is not None:
                log.skip(item.name, item.error)
            else:
                by_shape.setdefault(tuple(item.pixels.shape), []).append(item.pixels)
        for group in by_shape.values():
            yield to_device(torch.stack(group), device)
        left -= len(items)
        if stream and left <= 0:
            return


def iter_tokens(
    backbone: Backbone,
    source: ImageSource | ImageStream,
    image_transform: ImageTransform,
    *,
    blocks: int | str | Sequence[int] = "last",
    corrections: Mapping[str, Correction] | None = None,
    norm: bool = True,
    block_features: str = "residual",
    precision: str = "bf16",
    keys: bool = False,
    attentions: int | str | Sequence[int] = (),
    indices: Iterable[int] | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    keep_images: bool = False,
    across_ranks: bool = False,
    start_step: int = 0,
    log: RunLog | None = None,
    progress: Progress | None = None,
    stage: str = "encoding",
) -> Iterator[TokenBatch]:
    """Encode ``source`` (or its ``indices``) batch by batch; see the module doc.

    ``corrections`` (name → correction, checked against the backbone by the caller) add one
    variant each. ``across_ranks`` shares the work between the processes of a :mod:`torch.distributed` group;
    ``start_step`` skips this process's first loader batches (a resumed run). ``precision``: see
    :func:`encode`."""
    if batch_size < 1:
        raise SoapvitError(f"--batch-size must be at least 1, not {batch_size}")
    device = backbone.device
    log = log if log is not None else RunLog()
    corrections = dict(corrections or {})
    if "original" in corrections:
        raise SoapvitError("'original' names the uncorrected tokens, not a correction")
    for correction in corrections.values():
        correction.prepare(backbone)
    wrapped = {name: c.wrap(backbone) for name, c in corrections.items() if not c.maps_output(backbone)}
    workers = default_workers(device) if num_workers is None else num_workers
    steps, total, done = _steps(source, image_transform, indices, batch_size, workers, keep_images, across_ranks,
                                start_step, device.type == "cuda", log)
    if progress:
        progress(stage, done, total)  # the bar shows before the first batch is decoded
    options = dict(norm=norm, block_features=block_features, keys=keys, attentions=attentions,
                   precision=check_precision(precision))
    for step, items in steps:
        by_shape: dict[tuple[int, ...], list[_Item]] = {}
        for item in items:
            for note in item.notes:
                log.warn(note)
            if item.error is not None:
                log.skip(item.name, item.error)
            else:
                by_shape.setdefault(tuple(item.pixels.shape), []).append(item)
        groups = list(by_shape.values())
        for number, group in enumerate(groups, 1):
            pixels = to_device(torch.stack([item.pixels for item in group]), device)
            variants = {"original": encode(backbone, pixels, blocks, **options)}
            for name, correction in corrections.items():
                variants[name] = (encode(wrapped[name], pixels, blocks, **options) if name in wrapped
                                  else correction.correct(variants["original"]))
            yield TokenBatch([item.index for item in group], [item.target for item in group],
                             [item.image for item in group] if keep_images else None, pixels, variants,
                             step=step, ends_step=number == len(groups))
        done += len(items)
        if progress:
            progress(stage, done, total)
