"""Image sources: the one small protocol every dataset offers the token pipeline.

A source is indexable: :meth:`~ImageSource.name` names item ``i`` in messages,
:meth:`~ImageSource.image_size` gives its ``(width, height)`` cheaply (file header), and
:meth:`~ImageSource.load` decodes it as ``(image, target)`` where the image is a PIL image or a
uint8 tensor ``(3, H, W)`` and the target is whatever the job scores against (a saliency mask, a
label map, a class index, or ``None``). ``load`` raises :class:`~soapvit.errors.SoapvitError`
naming the file when an item cannot be read; the pipeline records it and moves on.

Sequential data (tar shards, read without extracting them) is an :class:`ImageStream` instead:
:meth:`~ImageStream.stream` yields the items one reader (a process × a DataLoader worker) reads.
:func:`open_images` is the one entry for ``--images``: a folder (recursive), a file list or shards.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor

from .augment import random_resized_flip
from .images import DataFolderError, ImageReadError, list_images, load_image, open_image
from .labelled import LabelledImages
from .shards import IMAGE_PARTS, _read_shard

EXIF_ORIENTATION = 0x0112
SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90°


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...

    def image_size(self, index: int) -> tuple[int, int]: ...

    def load(self, index: int) -> tuple[Image.Image | Tensor, Any]: ...


Loader = Callable[[], tuple[Image.Image | Tensor, Any]]


class ImageStream(Protocol):
    """Items read in order. ``stream(reader, readers)`` yields ``(index, name, load)`` for this
    reader's items only (readers never overlap; together they read every item once); ``index`` is
    unique and sorts items in stream order, and ``load()`` decodes the item as
    :meth:`ImageSource.load`.
    ``limit``: at most this many items, if known."""

    limit: int | None

    def stream(self, reader: int, readers: int) -> Iterator[tuple[int, str, Loader]]: ...


def is_stream(source: ImageSource | ImageStream) -> bool:
    return hasattr(source, "stream")


def header_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file as displayed (EXIF rotation applied), from its header."""
    try:
        with open_image(path) as img:
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


class AnnotatedImages:
    """The source protocol for datasets of ``samples`` with an ``image`` path and an annotation:
    subclasses say how to read the annotation at the image's size (:meth:`load_target`)."""

    samples: list

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return str(self.samples[index].image)

    def image_size(self, index: int) -> tuple[int, int]:
        return header_size(self.samples[index].image)

    def load(self, index: int) -> tuple[Image.Image, Any]:
        sample = self.samples[index]
        image = load_image(sample.image)
        return image, self.load_target(sample, image.size)

    def load_target(self, sample, size: tuple[int, int]) -> Any:
        raise NotImplementedError


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


@dataclass
class TarShards:
    """Webdataset-style tar shards (``KEY.jpg`` + ``KEY.cls`` …, ``.tar`` or ``.tar.gz``) streamed
    without extracting; the target is ``None``. Readers split whole shards round-robin when there
    are at least as many shards as readers and no ``limit``; otherwise every reader walks the
    stream (up to ``limit`` samples) and decodes every ``readers``-th sample. A sample's index is
    ``shard number · 2³² + its position in the shard``."""

    shards: Sequence[Path]
    limit: int | None = None

    def stream(self, reader: int, readers: int) -> Iterator[tuple[int, str, Loader]]:
        by_shard = self.limit is None and len(self.shards) >= readers
        numbers = range(reader, len(self.shards), readers) if by_shard else range(len(self.shards))
        position = 0
        for number in numbers:
            shard, problems = Path(self.shards[number]), []
            for offset, (key, parts) in enumerate(_read_shard(shard, problems)):
                if self.limit is not None and position >= self.limit:
                    return
                if by_shard or position % readers == reader:
                    name = f"{shard.name}:{key}"
                    yield (number << 32) + offset, name, _sample_loader(parts, name)
                position += 1
            for problem in problems:
                yield ((number + 1) << 32) - 1, str(shard), _failing_loader(ImageReadError(f"shard {problem}"))


def _sample_loader(parts: dict[str, bytes], name: str) -> Loader:
    def load() -> tuple[Image.Image, None]:
        data = next((parts[ext] for ext in IMAGE_PARTS if ext in parts), None)
        if data is None:
            raise ImageReadError(f"sample {name} has no {'/'.join('.' + ext for ext in IMAGE_PARTS)} image")
        return load_image(io.BytesIO(data), name=name), None

    return load


def _failing_loader(error: ImageReadError) -> Loader:
    def load():
        raise error

    return load


BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
MAX_SHARDS = 100_000
"""Most shards a brace pattern may name: beyond, the pattern is refused before any is opened."""


def iter_braces(pattern: str) -> Iterator[str]:
    """Shell-style ``{000..012}`` ranges (zero padding kept) and ``{a,b}`` lists, left to right,
    one name at a time: a range of millions costs nothing until its names are asked for."""
    matches = [m for m in (BRACE_RANGE.search(pattern), BRACE_LIST.search(pattern)) if m is not None]
    if not matches:
        yield pattern
        return
    match = min(matches, key=lambda m: m.start())
    if match.re is BRACE_RANGE:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        options: Iterable[str] = (str(n).zfill(width) for n in range(int(first), int(last) + 1))
    else:
        options = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    for option in options:
        yield from iter_braces(head + option + tail)


def expand_braces(pattern: str) -> list[str]:
    """Every name of :func:`iter_braces` as a list."""
    return list(iter_braces(pattern))


def shard_paths(pattern: str, what: str = "--images") -> list[Path]:
    """The shards a path or brace pattern names, each an existing file: the first missing one
    ends the expansion with an error naming it and the pattern, and a pattern naming more than
    :data:`MAX_SHARDS` is refused once that many have been seen (nothing is stat-ed beyond)."""
    shards = []
    for name in iter_braces(pattern):
        if len(shards) >= MAX_SHARDS:
            raise DataFolderError(f"{what} {pattern}: names more than {MAX_SHARDS} shards (MAX_SHARDS); "
                                  "give a smaller range")
        path = Path(name)
        if not path.is_file():
            kind = "is not a file" if path.exists() else "does not exist"
            raise DataFolderError(f"{what} {pattern}: shard {path} {kind}")
        shards.append(path)
    return shards


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def open_images(spec: str | Path, limit: int | None = None, *, what: str = "--images") -> ImageSource | ImageStream:
    """``--images``: tar shards (a ``.tar``/``.tar.gz`` path or brace pattern) as a stream; a text
    file listing one image path per line (relative to the list's folder; blank lines and ``#``
    comments ignored); or a folder searched recursively. At most ``limit`` images."""
    text = str(spec)
    if text.endswith(SHARD_SUFFIXES):
        return TarShards(shard_paths(text, what), limit)
    path = Path(spec)
    if path.is_file():
        return ImageFiles(read_file_list(path, what)[:limit])
    return ImageFiles(list_images(path, limit, recursive=True, what=what))


def read_file_list(path: Path, what: str = "--images") -> list[Path]:
    """The image paths listed in ``path``, one per line, relative to its folder."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataFolderError(f"{what}: cannot read the file list {path}: {err}") from err
    files = [path.parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not files:
        raise DataFolderError(f"{what}: the file list {path} names no image")
    return files
