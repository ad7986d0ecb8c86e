"""Reading safetensors files (heads, checkpoints) with their metadata, as user errors."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .errors import SoapvitError


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of ``path``; a missing or unreadable file raises a
    :class:`SoapvitError` naming ``what`` (e.g. ``"head file"``) and the path."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SoapvitError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises several unrelated error types
        raise SoapvitError(f"{what} {path} is not a readable safetensors file: {err}") from err
    return tensors, metadata
