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
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from safetensors.torch import save_file

from ..backbones.base import Backbone
from ..errors import SoapvitError
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
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(handle)
        try:
            save_file(tensors, partial, metadata=meta)
            os.chmod(partial, 0o644)
            os.replace(partial, path)  # a killed save never leaves a half-written file behind
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CorrectionSet:
        """Read a file written by :meth:`save` (or a SOAP head file of format 1)."""
        from . import METHODS

        tensors, meta = read_safetensors(path, "corrections file")
        if meta.get("format") not in READABLE:
            raise SoapvitError(f"{path} is not a soapvit corrections file (format {meta.get('format')!r})")
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
            for name, description in described.items():
                method = description["method"]
                if method == "soap":
                    corrections[name] = SoapHead.restore(description, tensors, metadata)
                    continue
                if method not in METHODS:
                    raise SoapvitError(f"{path}: correction {name!r} has an unknown method {method!r}")
                prefix = f"correction.{name}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                corrections[name] = METHODS[method].restore(description, own)
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise SoapvitError(f"corrections file {path} is incomplete or damaged ({type(err).__name__}: {err})") from None
        if metadata.get("blocks") is None and "soap" in corrections:
            metadata["blocks"] = sorted(corrections["soap"].blocks)
        head = corrections.get("soap")
        if isinstance(head, SoapHead) and "posmean" not in corrections:
            d = head.blocks[head.apply_block]
            if d.position_mean is not None:
                corrections["posmean"] = PositionMean().fit_offset(d.position_mean, d.mean, head.apply_block)
        return cls(corrections, metadata)
