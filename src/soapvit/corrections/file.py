"""One safetensors file for the corrections of one fit.

Layout: the SOAP head's tensors at the top (``projector``, ``block.{b}.{field}``: every reader of
SOAP files keeps working), every other correction's fitted tensors under
``correction.{name}.{attribute}``; JSON metadata: ``format``, ``metadata`` (the fit: backbone id
and weights digest, blocks, block-feature convention, input size and grid, images, generator,
skipped files) and ``corrections`` (per name: method, parameters, block, width).

A SOAP-only file (format ``soapvit-head/1`` included) also gives ``posmean``: the per-position
mean token is part of the SOAP decomposition.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from ..backbones.base import Backbone
from ..errors import SoapvitError
from ..io import save_safetensors
from ..safetensors_io import read_safetensors
from .base import Correction, check_backbone
from .posmean import PositionMean
from .soap import SoapHead

FORMAT = "soapvit-corrections/2"
READABLE = ("soapvit-head/1", FORMAT)


class CorrectionSet(Mapping[str, Correction]):
    """Named, fitted corrections of one fit and the fit's metadata."""

    def __init__(self, corrections: Mapping[str, Correction], metadata: dict) -> None:
        self.corrections = dict(corrections)
        self.metadata = dict(metadata)

    def __getitem__(self, name: str) -> Correction:
        return self.corrections[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.corrections)

    def __len__(self) -> int:
        return len(self.corrections)

    def select(self, names: Iterable[str] | None) -> CorrectionSet:
        """The named corrections (all when ``names`` is None); an unknown name is an error."""
        if names is None:
            return self
        names = list(names)
        unknown = [n for n in names if n not in self.corrections]
        if unknown:
            raise SoapvitError(f"--variants: {', '.join(unknown)} not in the file (it holds "
                               f"{', '.join(self.corrections) or 'nothing'})")
        return CorrectionSet({n: self.corrections[n] for n in names}, self.metadata)

    def check_backbone(self, backbone: Backbone, *, allow_other: bool = False) -> None:
        """The backbone check (:func:`~soapvit.corrections.base.check_backbone`)."""
        check_backbone(self.metadata, self.corrections.values(), backbone, allow_other=allow_other)

    @property
    def soap(self) -> SoapHead | None:
        head = self.corrections.get("soap")
        return head if isinstance(head, SoapHead) else None

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the file atomically (a unique temporary file beside it, then a rename)."""
        tensors, described = {}, {}
        for name, correction in self.corrections.items():
            described[name] = correction.describe()
            prefix = "" if isinstance(correction, SoapHead) else f"correction.{name}."
            tensors.update({prefix + k: v.detach().cpu().contiguous() for k, v in correction.state().items()})
        meta = {"format": FORMAT, "metadata": json.dumps(self.metadata), "corrections": json.dumps(described)}
        path = Path(path)
        if path.is_dir():
            raise SoapvitError(f"corrections file {path} is a folder: give a file name (.safetensors)")
        return save_safetensors(tensors, path, meta, "corrections file")  # a killed save leaves the old file

    @classmethod
    def load(cls, path: str | Path) -> CorrectionSet:
        """Read a file written by :meth:`save` (or a SOAP head file of format 1)."""
        from . import METHODS

        tensors, meta = read_safetensors(path, "corrections file")
        if meta.get("format") not in READABLE:
            raise SoapvitError(f"{path} is not a soapvit corrections file (format {meta.get('format')!r})")

        def damaged(reason: str) -> SoapvitError:
            return SoapvitError(f"damaged corrections file {path}: {reason}")

        for key, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise damaged(f"tensor {key} holds NaN or inf values")
        try:
            metadata = json.loads(meta["metadata"])
            metadata.setdefault("blocks", metadata.pop("layers", None))  # files before the rename
            if meta["format"] == "soapvit-head/1":
                blocks = json.loads(meta["blocks"])
                apply_block = int(meta.get("apply_block", meta.get("apply_layer")))
                described = {"soap": {"method": "soap", "block": apply_block, "blocks": blocks}}
            else:
                described = json.loads(meta["corrections"])
            corrections: dict[str, Correction] = {}
            if not isinstance(described, dict) or not described:
                raise damaged("its metadata names no corrections")
            for name, description in described.items():
                method = description["method"]
                if method == "soap":
                    reason = soap_damage(description, tensors)
                    if reason:
                        raise damaged(reason)
                    corrections[name] = SoapHead.restore(description, tensors, metadata)
                    continue
                if method not in METHODS:
                    raise SoapvitError(f"{path}: correction {name!r} has an unknown method {method!r}")
                prefix = f"correction.{name}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                corrections[name] = METHODS[method].restore(description, own)
        except SoapvitError:
            raise
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as err:
            raise damaged(f"incomplete ({type(err).__name__}: {err})") from None
        if metadata.get("blocks") is None and "soap" in corrections:
            metadata["blocks"] = sorted(corrections["soap"].blocks)
        head = corrections.get("soap")
        if isinstance(head, SoapHead) and "posmean" not in corrections:
            d = head.blocks[head.apply_block]
            if d.position_mean is not None:
                corrections["posmean"] = PositionMean().fit_offset(d.position_mean, d.mean, head.apply_block)
        return cls(corrections, metadata)


EIGENVALUE_ROUNDING = 1e-6
"""Eigenvalues may be negative by this share of the largest (rounding of a covariance's
eigendecomposition); more means the file was damaged."""


def soap_damage(description: dict, tensors: Mapping) -> str | None:
    """Why the SOAP tensors of a file cannot be a fitted head, or None: every block the metadata
    names present with consistent shapes, weights in [0, 1], eigenvalues ≥ 0 up to rounding."""
    blocks = description.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        return "its metadata names no fitted blocks"
    apply_block = description.get("block")
    if apply_block not in blocks:
        return f"the head applies at block {apply_block!r}, which is not among its fitted blocks {blocks}"
    for b in blocks:
        field = {n: tensors.get(f"block.{b}.{n}") for n in ("mean", "eigenvalues", "eigenvectors", "si", "weights",
                                                              "p_real", "q_synthetic", "position_share",
                                                              "position_mean")}
        missing = [n for n, v in field.items() if v is None and n != "position_mean"]
        if missing:
            return f"block {b} lacks {', '.join(missing)}"
        d = field["mean"].numel()
        grid = tuple(field["p_real"].shape)
        expected = {"mean": (d,), "eigenvalues": (d,), "eigenvectors": (d, d), "si": (d,), "weights": (d,),
                    "position_share": (d,)}
        if len(grid) != 3 or grid[-1] != d:
            return f"block.{b}.p_real has shape {list(grid)}, not (h, w, {d})"
        expected |= {"q_synthetic": grid, "position_mean": grid}
        for n, shape in expected.items():
            if field[n] is not None and tuple(field[n].shape) != shape:
                return f"block.{b}.{n} has shape {list(field[n].shape)}, not {list(shape)}"
        eigenvalues = field["eigenvalues"].double()
        for n in ("weights", "si"):
            values = field[n].double()
            if bool(((values < 0) | (values > 1)).any()):
                return f"block.{b}.{n} lie outside [0, 1] (min {values.min():.3g}, max {values.max():.3g})"
        if bool((eigenvalues < -EIGENVALUE_ROUNDING * eigenvalues.abs().max().clamp_min(1e-12)).any()):
            return f"block.{b}.eigenvalues are negative beyond rounding (min {eigenvalues.min():.3g})"
    return None
