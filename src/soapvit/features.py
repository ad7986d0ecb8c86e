"""Feature extraction loop shared by SOAP fitting, evaluations and probes.

:func:`iter_batches` turns a list of image files into normalised batches on the compute device,
skipping unreadable files (reported once at the end); :func:`encode` runs a backbone under
``no_grad`` with bf16 autocast on CUDA.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .backbones.base import Backbone, Features
from .errors import SoapvitError
from .data.images import ImageFolderDataset, ImageTransform, collate_skipping


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` → CUDA if available, else CPU; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise SoapvitError(f"--device: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SoapvitError(f"--device {device}: CUDA is not available on this machine")
    return dev


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
class SkipReport:
    """Files that could not be read during a pass."""

    files: list[Path] = field(default_factory=list)

    def warn(self) -> None:
        if self.files:
            shown = ", ".join(str(f) for f in self.files[:5])
            more = f" and {len(self.files) - 5} more" if len(self.files) > 5 else ""
            warnings.warn(f"skipped {len(self.files)} unreadable image(s): {shown}{more}", stacklevel=2)


def iter_batches(
    files: Sequence[Path],
    transform: ImageTransform,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    skipped: SkipReport | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(pixels on device, file indices)``; unreadable files are appended to ``skipped``."""
    dataset = ImageFolderDataset(files, transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        pin_memory=torch.device(device).type == "cuda",
    )
    seen = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported once, by SkipReport
        for pixels, indices in loader:
            expected = range(seen, min(seen + batch_size, len(files)))
            seen += batch_size
            if skipped is not None:
                got = set(indices.tolist())
                skipped.files.extend(files[i] for i in expected if i not in got)
            if pixels is None:
                continue
            yield pixels.to(device, non_blocking=True), indices
