"""The correction protocol, the head rule and the backbone check: each written once.

A :class:`Correction` is an estimator in the scikit-learn style: hyper-parameters are the
arguments of ``__init__`` (checked against the class's declarative ``constraints``), ``fit``
reads the statistics of one fit (:class:`~soapvit.stats.FitStatistics`) and sets the fitted
state in trailing-underscore attributes (``block_``, ``dim_`` and the method's tensors, named in
``fitted``), ``transform`` maps a block's patch-token grid ``(B, h, w, D)``. A method that needs
its own pass over images (``calibrates``) implements ``calibrate`` instead of ``fit``; one that
cannot be written as a map of one block's tokens (``edits_forward``) overrides ``wrap``.

The head rule (:class:`CorrectedBackbone`): a correction at the last block maps the output
tokens, so it is computed from the original forward pass (:meth:`Correction.correct`); a
correction at an earlier block replaces that block's patch tokens (the residual stream) inside
the forward pass, so every later block sees the corrected tokens.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor

from ..backbones.base import Backbone, Features, RawOutput
from ..errors import SoapvitError
from ..validation import validate

BRANCH_REFUSAL = ("was fitted on --block-features branch (the MLP-branch output the SOAP authors hook for "
                  "their depth sweep): such a file is for diagnosis, not for applying; fit with the default "
                  "--block-features residual")


class Correction:
    """A training-free map of patch tokens fitted for one backbone and block (see module doc)."""

    method: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    """What the fit must gather: ``moments``, ``responses``, ``positions``, ``norms``, ``zero_image``."""
    fitted: ClassVar[tuple[str, ...]] = ()
    """Tensor attributes (trailing underscore) saved with the correction."""
    constraints: ClassVar[dict] = {}
    calibrates: ClassVar[bool] = False
    edits_forward: ClassVar[bool] = False
    source: ClassVar[str] = ""
    """The publication the method comes from."""

    block_: int
    dim_: int

    def __init__(self) -> None:
        self.check_params()

    # -- parameters ----------------------------------------------------------------------------
    def get_params(self) -> dict:
        """The ``__init__`` arguments and their current values (plain data)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def check_params(self) -> None:
        validate(self.get_params(), self.constraints)

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, stats, block: int) -> Correction:
        """Fit from the statistics of one fit (:class:`~soapvit.stats.FitStatistics`) at ``block``."""
        raise NotImplementedError

    def calibrate(self, backbone: Backbone, batches: Iterable[Tensor], block: int) -> Correction:
        """Fit by its own pass over ``batches`` of normalised pixels (``calibrates`` methods)."""
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "block_")

    # -- applying ------------------------------------------------------------------------------
    def transform(self, tokens: Tensor) -> Tensor:
        """Corrected patch tokens ``(B, h, w, D)`` of block ``block_``."""
        raise NotImplementedError

    def prepare(self, backbone: Backbone) -> None:
        """Called once before a pass with the backbone the correction is applied to (a method that
        computes something per input size keeps what it needs here)."""

    def at_grid(self, grid: tuple[int, int]) -> None:
        """Called before a forward pass that applies the correction inside it at ``grid``: what the
        transform computes per input size with the backbone is computed here, outside that pass."""

    def maps_output(self, backbone: Backbone) -> bool:
        """The head rule: a map at the last block is computed from the original forward pass."""
        return not self.edits_forward and self.block_ == backbone.num_blocks - 1

    def correct(self, features: Features) -> Features:
        """Features with block ``block_``'s tokens transformed, nothing else (keys are computed
        inside the block, before its output)."""
        tokens = dict(features.tokens)
        if self.block_ in tokens:
            tokens[self.block_] = self.transform(tokens[self.block_])
        return Features(tokens=tokens, prefix=features.prefix, keys=features.keys, attentions=features.attentions)

    def wrap(self, backbone: Backbone) -> Backbone:
        """``backbone`` with this correction in its forward pass (:class:`CorrectedBackbone`)."""
        return CorrectedBackbone(backbone, self)

    # -- persistence ---------------------------------------------------------------------------
    def state(self) -> dict[str, Tensor]:
        """The fitted tensors, by attribute name."""
        return {name: getattr(self, name) for name in self.fitted if getattr(self, name, None) is not None}

    def describe(self) -> dict:
        """Plain data saved beside the tensors: method, parameters, block, width."""
        return {"method": self.method, "params": self.get_params(), "block": self.block_, "dim": self.dim_}

    @classmethod
    def restore(cls, description: dict, tensors: dict[str, Tensor]) -> Correction:
        """The inverse of :meth:`describe` and :meth:`state`."""
        correction = cls(**description["params"])
        correction.block_, correction.dim_ = int(description["block"]), int(description["dim"])
        for name in cls.fitted:
            if name in tensors:
                setattr(correction, name, tensors[name])
        return correction

    def digest(self) -> str:
        """Short content digest of the fitted tensors, parameters and block."""
        import json

        from ..backbones.wheels import tensor_digest

        tensors = {**self.state(), "describe": torch.tensor(list(json.dumps(self.describe(), sort_keys=True,
                                                                               default=str).encode()))}
        return tensor_digest(tensors)[:16]


def correct_sequence(correction: Correction, sequence: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Apply ``correction.transform`` to the patch tokens of a sequence ``(B, P + h*w, D)``."""
    patches = sequence[:, num_prefix:]
    b, n, d = patches.shape
    corrected = correction.transform(patches.reshape(b, *grid, d)).reshape(b, n, d)
    return torch.cat([sequence[:, :num_prefix], corrected.to(sequence.dtype)], dim=1)


class CorrectedBackbone(Backbone):
    """A backbone with a correction in its forward pass, by the one head rule (module doc)."""

    def __init__(self, backbone: Backbone, correction: Correction) -> None:
        desc = backbone.describe()
        desc.pop("model_id")
        super().__init__(f"{backbone.model_id}+{correction.method}", **desc)
        self.backbone = backbone
        self.correction = correction
        correction.prepare(backbone)

    def block_modules(self):
        return self.backbone.block_modules()

    def _run(self, pixels, blocks, norm, keys, attentions, edits) -> RawOutput:
        b, p, grid = self.correction.block_, self.num_prefix_tokens, self.grid_size(pixels)
        self.correction.at_grid(grid)
        edit = lambda seq: correct_sequence(self.correction, seq, p, grid)  # noqa: E731
        if b == self.num_blocks - 1:
            raw = self.backbone._run(pixels, blocks, norm, keys, attentions, edits)
            if b in raw.hidden:
                raw.hidden[b] = edit(raw.hidden[b])
            return raw
        return self.backbone._run(pixels, blocks, norm, keys, attentions, {**edits, b: edit})


def attach(backbone: Backbone, correction: Correction) -> Backbone:
    """``backbone`` whose forward pass applies ``correction`` (the head rule)."""
    return correction.wrap(backbone)


def check_backbone(metadata: dict, corrections: Iterable[Correction], backbone: Backbone, *,
                   allow_other: bool = False, what: str = "the head") -> None:
    """The one backbone check. Refuse a backbone the corrections were not fitted for: another
    width or too few blocks always, a ``branch``-feature fit always, another model id or other
    weights unless ``allow_other``."""
    if metadata.get("block_features", "residual") == "branch":
        raise SoapvitError(f"{what} {BRANCH_REFUSAL}")
    for c in corrections:
        if c.dim_ != backbone.embed_dim:
            raise SoapvitError(f"{what} has dimension {c.dim_} but {backbone.model_id} has {backbone.embed_dim}")
        if c.block_ >= backbone.num_blocks:
            raise SoapvitError(f"{what} applies to block {c.block_} but {backbone.model_id} has "
                               f"{backbone.num_blocks} blocks")
    inside = sorted({c.block_ for c in corrections if not c.edits_forward and not c.maps_output(backbone)})
    if inside and metadata.get("norm", True) is True:
        warnings.warn(f"{what} at block {', '.join(map(str, inside))} was fitted on final-norm tokens but edits the "
                      "residual stream inside the forward pass: refit it (a fit now gathers each block's tokens as "
                      "the correction there edits them)", stacklevel=2)
    fitted = metadata.get("backbone")
    if allow_other or fitted is None:
        return
    if fitted != backbone.model_id:
        raise SoapvitError(f"{what} was fitted for {fitted}, not {backbone.model_id} "
                           "(--allow-other-backbone to apply it anyway)")
    digest = metadata.get("weights_digest")
    if digest is not None and digest != backbone.weights_digest():
        raise SoapvitError(f"{what} was fitted for other weights of {fitted} (digest {digest}, these "
                           f"{backbone.weights_digest()}; --allow-other-backbone to apply it anyway)")
