"""Reading images and annotations robustly.

One reader for the whole project: every image goes through :func:`load_image`, every mask or
label map through :func:`read_annotation`, every folder through :func:`list_images`. Errors name
the file; the token pipeline (:mod:`soapvit.features`) records unreadable files and moves on, so a
long job never loses its finished work to one bad image.

How :func:`load_image` turns a file into 8-bit RGB:

- EXIF orientation is applied (the image as displayed);
- 16-bit samples are scaled by their bit depth (``round(value / 257)``), never clipped; 32-bit
  integer images are read as 16-bit when their values fit, floating-point images are refused;
- alpha (RGBA, LA, palette or colour-key transparency) is composited over black: a pixel's
  colour is multiplied by its opacity, so fully transparent pixels are black;
- CMYK is converted without colour management; CMYK JPEGs are read with Adobe's inverted
  polarity, as Pillow does for every CMYK JPEG;
- an image with more than :data:`MAX_PIXELS` pixels is downscaled by an integer factor, JPEGs
  while decoding (1/2 to 1/8), with a warning; a file that would need more than
  :data:`MAX_DECODE_PIXELS` pixels decoded at once (annotations too) is skipped as a possible
  decompression bomb, as is one beyond Pillow's own limit (``Image.MAX_IMAGE_PIXELS``, twice).

:func:`read_annotation` refuses a file that looks like a photo rather than an annotation
(:func:`photo_reason`), e.g. the image folder given as ``--masks``: more than
:data:`PHOTO_LEVELS` distinct values (colours for a colour file) and either channels that differ
on more than :data:`COLOUR_SHARE` of the pixels, or the two most common values on less than
:data:`TWO_LEVEL_SHARE` of them. A saliency mask is two-level (anti-aliased edges are a thin band
of grey levels), a label map holds a few class ids; a photo has thousands of colours, or, in
grey, a histogram without two dominant values. A grey photo whose two most common values cover
half of it (a dark object on a white page) is not told apart.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from ..errors import SoapvitError
from ..validation import OPTIONAL_COUNT, validate

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
MAX_PIXELS = 2**25
"""Most pixels of a returned image (e.g. 8192 × 4096); larger images are downscaled."""
MAX_DECODE_PIXELS = 2**26
"""Most pixels decoded at once (JPEGs count at their reduced decoding size); beyond: skipped."""
SIXTEEN_BIT_MAX = 65535
NAME_KEY = "soapvit.name"
"""``Image.info`` key under which :func:`load_image` records the name of the image it returns."""
# What Pillow's decoders raise on corrupt, truncated or hostile files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, ZeroDivisionError,
                 struct.error, Image.DecompressionBombError)
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
PHOTO_LEVELS = 100
"""Most distinct values (colours for a colour file) an annotation may hold without its histogram
being looked at: beyond, :func:`photo_reason` decides whether it is a photo."""
COLOUR_SHARE = 0.01
"""Share of pixels whose channels differ (by more than :data:`COLOUR_TOLERANCE`) that makes a
many-coloured annotation a colour photo."""
COLOUR_TOLERANCE = 16
"""Channel difference below which a pixel counts as grey (JPEG noise of a grey mask saved as RGB)."""
TWO_LEVEL_SHARE = 0.5
"""Least share of pixels at its two most common values of a many-valued annotation: a mask's two
levels cover most of it, its anti-aliased edges a thin band."""


class ImageReadError(SoapvitError):
    """An image file that cannot be decoded; the message names the file."""


class AnnotationError(ImageReadError):
    """A file that decodes but holds no annotation (a photo given as a mask or a label map); the
    message names the file and says why."""


class DataFolderError(SoapvitError):
    """A folder argument that is missing, not a folder, or holds no images."""


def list_images(folder: str | Path, limit: int | None = None, *, what: str = "--images",
                recursive: bool = False) -> list[Path]:
    """Sorted image files inside ``folder`` (by extension; with ``recursive`` also in its
    subfolders, e.g. ImageNet's class folders), at most ``limit``. Hidden files and folders
    (names starting with ``.``, e.g. macOS ``._x.jpg`` resource forks) are left out.

    Raises :class:`DataFolderError` naming ``what`` if the folder is missing or has no images.
    """
    validate({"limit": limit}, {"limit": OPTIONAL_COUNT})
    folder = Path(folder)
    if not folder.exists():
        raise DataFolderError(f"{what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise DataFolderError(f"{what}: {folder} is not a folder")
    files = list(_scan(folder, recursive))
    if not files:
        raise DataFolderError(f"{what}: folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files[:limit] if limit else files


def _scan(folder: Path, recursive: bool, seen: set[tuple[int, int]] | None = None) -> Iterator[Path]:
    """Visible image files under ``folder`` in path order (each folder's entries sorted by name,
    depth first), from :func:`os.scandir`: entries carry their type, so a million-file folder
    costs no stat call per file and no global sort. A folder is entered once: a symlink back to a
    folder already scanned (a loop) or a link loop is skipped with a warning naming it."""
    if seen is None:
        seen = {_identity(folder)}
    with os.scandir(folder) as scanned:
        entries = sorted(scanned, key=lambda entry: entry.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir, is_file = entry.is_dir(), entry.is_file()
        except OSError:  # a link loop: neither, listed below (reading it fails with the reason)
            is_dir, is_file = False, False
        if is_file or (entry.is_symlink() and not is_dir):
            # a dangling link (or a link loop) is listed too: reading it fails, and the run lists it as skipped
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(entry.path)
        elif recursive and is_dir:
            identity = _identity(entry.path)
            if identity in seen:
                warnings.warn(f"skipped folder {entry.path}: a link to a folder already scanned "
                              f"({os.path.realpath(entry.path)}), not followed twice", stacklevel=3)
                continue
            seen.add(identity)
            yield from _scan(Path(entry.path), recursive, seen)


def _identity(path: str | Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def open_image(path: str | Path | BinaryIO) -> Image.Image:
    """``Image.open`` of a regular file only (or an open stream): reading a FIFO or a device
    would block forever or never end, so anything else fails with an ``OSError`` saying what it is."""
    if isinstance(path, (str, os.PathLike)):
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
            raise OSError(f"it is {kind}, not a regular file")
    return Image.open(path)


def load_image(path: str | Path | BinaryIO, *, name: str | None = None) -> Image.Image:
    """Decode ``path`` (a file or an open binary stream) as an 8-bit RGB image, as described in
    the module docstring; messages call it ``name`` (default: ``path``).

    Raises :class:`ImageReadError` naming the file and the reason for any unreadable file.
    """
    name = name or str(path)
    try:
        with open_image(path) as img:
            stored = img.size
            _draft_within_limit(img)
            _check_decode_size(img)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            rgb = _to_rgb(img)
    except DECODE_ERRORS as err:
        raise _read_error("image", name, err) from err
    image = _downscale_to_limit(rgb)
    if image.width * image.height < stored[0] * stored[1]:
        warnings.warn(f"image {name} is {stored[0]}x{stored[1]}, more than {MAX_PIXELS} pixels (MAX_PIXELS): "
                      f"downscaled to {image.width}x{image.height}", stacklevel=2)
    image.info[NAME_KEY] = name  # so later warnings (the transform's token cap) can name the file
    return image


def read_annotation(path: str | Path, size: tuple[int, int] | None = None, *, kind: str = "mask") -> Image.Image:
    """Decode an annotation (saliency mask, label map) as stored, without colour conversion
    (EXIF orientation applied); if ``size = (W, H)`` differs, resize with nearest neighbour and
    warn naming the file. A file that looks like a photo (:func:`photo_reason`) raises
    :class:`AnnotationError`."""
    try:
        with open_image(path) as img:
            _check_decode_size(img)
            img.load()
            annotation = ImageOps.exif_transpose(img)
    except DECODE_ERRORS as err:
        raise _read_error(kind, path, err) from err
    reason = photo_reason(annotation)
    if reason is not None:
        raise AnnotationError(f"{kind} {path} looks like a photo, not a {kind}: {reason}")
    if size is not None and annotation.size != size:
        warnings.warn(f"{kind} {path} is {annotation.size[0]}x{annotation.size[1]} but its image is "
                      f"{size[0]}x{size[1]}: resized with nearest neighbour", stacklevel=3)
        annotation = annotation.resize(size, Image.Resampling.NEAREST)
    return annotation


def photo_reason(img: Image.Image) -> str | None:
    """Why the stored pixels of ``img`` look like a photo rather than an annotation (see the
    module docstring), or None. Palette files are judged by their indices (the palette colours of
    a label map are names, not colours), alpha is left out."""
    if img.mode == "1":
        return None
    if len(img.getbands()) == 1:  # grey, 16-bit, float or palette indices
        values = np.asarray(img)
    elif img.mode in ("LA", "La", "PA"):
        values = np.asarray(img.getchannel(0))
    else:
        rgb = np.asarray(img.convert("RGB")).astype(np.int32)
        colours = np.unique(rgb.reshape(-1, 3) @ np.array([1 << 16, 1 << 8, 1], np.int32))
        if len(colours) > PHOTO_LEVELS:
            coloured = float(((rgb.max(-1) - rgb.min(-1)) > COLOUR_TOLERANCE).mean())
            if coloured > COLOUR_SHARE:
                return (f"{len(colours)} colours, with channels that differ on {coloured:.0%} of the pixels "
                        "(a mask or a label map has one channel and a few values)")
        values = np.asarray(img.convert("L"))
    if values.dtype == np.uint8:  # the usual case, without a sort
        counts = np.bincount(values.ravel(), minlength=256)
        counts = counts[counts > 0]
    else:
        counts = np.unique(values, return_counts=True)[1]
    if len(counts) <= PHOTO_LEVELS:
        return None
    two = float(np.sort(counts)[-2:].sum() / values.size)
    if two >= TWO_LEVEL_SHARE:
        return None
    levels = "palette indices" if img.mode == "P" else "grey levels"
    return (f"{len(counts)} {levels}, the two most common on only {two:.0%} of the pixels "
            "(a mask's two levels cover most of it; a label map holds a few class ids)")


def check_first_annotation(path: str | Path, read: Callable[[Path], object], what: str) -> None:
    """``read`` the first annotation of a dataset before any work: one that is no annotation (a
    photo, a colour-coded label map: :class:`AnnotationError`) is a one-line
    :class:`DataFolderError` naming ``what``; another read error is left to the run, which lists
    that image as skipped."""
    try:
        read(Path(path))
    except AnnotationError as err:
        raise DataFolderError(f"{what}: {err}") from None
    except ImageReadError:
        return


STREAM_REPR = re.compile(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>")


def _read_error(kind: str, path: str | Path, err: BaseException) -> ImageReadError:
    # Pillow names a stream by its repr (``<_io.BytesIO object at 0x…>``): the name says it already
    reason = STREAM_REPR.sub("", " ".join(str(err).split())) or type(err).__name__
    return ImageReadError(f"cannot read {kind} {path}: {reason}")


def _reduction_factor(width: int, height: int, limit: int) -> int:
    """Smallest integer ``f`` with ``ceil(width / f) · ceil(height / f) <= limit``."""
    factor = max(1, math.isqrt(width * height // limit))
    while math.ceil(width / factor) * math.ceil(height / factor) > limit:
        factor += 1
    return factor


def _draft_within_limit(img: Image.Image) -> None:
    """Let a JPEG above :data:`MAX_PIXELS` decode at 1/2, 1/4 or 1/8 scale (bounded memory)."""
    factor = _reduction_factor(*img.size, MAX_PIXELS)
    if factor > 1 and img.format == "JPEG":
        img.draft(img.mode, (math.ceil(img.width / factor), math.ceil(img.height / factor)))


def _check_decode_size(img: Image.Image) -> None:
    if img.width * img.height > MAX_DECODE_PIXELS:
        raise Image.DecompressionBombError(
            f"{img.width}x{img.height} pixels to decode, more than MAX_DECODE_PIXELS = {MAX_DECODE_PIXELS}: "
            "skipped as a possible decompression bomb")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I"):
        return _sixteen_bit_to_rgb(img)
    if img.mode == "F":
        raise ValueError("floating-point pixels have no defined 8-bit range")
    if "transparency" in img.info:  # palette or colour-key transparency
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        return _over_black(img.convert("RGBA"))
    return img.convert("RGB")


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale ``I;16*`` (or ``I`` with values in 0…65535) → RGB, ``round(value / 257)``."""
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > SIXTEEN_BIT_MAX):
        raise ValueError(f"{img.mode} pixels span {values.min()}..{values.max()}, outside 16 bits: unknown bit depth")
    gray = ((values * 255 + SIXTEEN_BIT_MAX // 2) // SIXTEEN_BIT_MAX).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _over_black(rgba: Image.Image) -> Image.Image:
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")


def _downscale_to_limit(img: Image.Image) -> Image.Image:
    factor = _reduction_factor(*img.size, MAX_PIXELS)
    return img.reduce(factor) if factor > 1 else img
