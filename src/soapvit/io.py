"""The one way soapvit writes a file: atomically, beside the target.

:func:`atomic_write` gives the writer a unique temporary file in the target's folder
(``.NAME.XXXXXXXX.partial``: concurrent writers of one path never share it), flushes it to disk
(``fsync``), makes it readable by others (0644) and renames it over the target. On any error the
temporary file is removed and the old target is left as it was; an ``OSError`` (a full disk, a
read-only folder) becomes one :class:`~soapvit.errors.SoapvitError` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SoapvitError


@contextmanager
def atomic_write(path: str | Path, what: str = "output") -> Iterator[Path]:
    """``with atomic_write(path) as tmp: write(tmp)``: ``path`` holds the new content afterwards,
    or (on error) its old content; nothing half-written is ever left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(handle)
    except OSError as err:
        raise SoapvitError(f"cannot write {what} {path}: {err.strerror or err}") from None
    partial = Path(name)
    try:
        yield partial
        with open(partial, "rb+") as done:
            os.fsync(done.fileno())
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except OSError as err:
        raise SoapvitError(f"cannot write {what} {path}: {err.strerror or err} (nothing was changed)") from None
    finally:
        if partial.exists():
            partial.unlink()
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_with(path: str | Path, writer: Callable[[Path], object], what: str = "output") -> Path:
    """``writer(tmp)`` writes the content to a temporary path; it then replaces ``path``."""
    with atomic_write(path, what) as partial:
        writer(partial)
    return Path(path)


def write_bytes(path: str | Path, data: bytes, what: str = "output") -> Path:
    return write_with(path, lambda p: p.write_bytes(data), what)


def write_text(path: str | Path, text: str, what: str = "output") -> Path:
    return write_bytes(path, text.encode("utf-8"), what)


def write_json(path: str | Path, payload, what: str = "JSON output", **dump) -> Path:
    return write_text(path, json.dumps(payload, **({"indent": 1} | dump)), what)


def save_safetensors(tensors, path: str | Path, metadata: dict[str, str] | None = None,
                     what: str = "safetensors file") -> Path:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(partial: Path) -> None:
        try:
            save_file(tensors, str(partial), metadata=metadata)
        except SafetensorError as err:  # its I/O errors (a full disk) are not OSErrors
            raise OSError(str(err).removeprefix("Error while serializing: ")) from None

    return write_with(path, write, what)


def save_figure(fig, path: str | Path, **savefig) -> Path:
    """A matplotlib figure, in the format of ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return write_with(path, lambda p: fig.savefig(p, format=fmt, **savefig), "figure")
