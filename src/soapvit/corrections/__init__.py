"""Training-free token corrections: SOAP and its published alternatives behind one protocol.

``METHODS`` maps each method's name to its class. :mod:`.base` holds the protocol, the head rule
and the backbone check; :mod:`.file` the one file format; one module per method.
"""

from __future__ import annotations

from .base import Correction, CorrectedBackbone, attach, check_backbone
from .blank import BlankTemplate
from .high_norm import HighNormRepair
from .position_pc import PositionComponents
from .posmean import PositionMean
from .registers import RegisterNeurons
from .soap import SoapConfig, SoapHead
from .top_pc import TopComponents
from .zero_subspace import ZeroSubspace

METHODS: dict[str, type[Correction]] = {cls.method: cls for cls in (
    SoapHead, PositionMean, BlankTemplate, ZeroSubspace, TopComponents, PositionComponents, HighNormRepair,
    RegisterNeurons)}

__all__ = ["METHODS", "Correction", "CorrectedBackbone", "CorrectionSet", "SoapConfig", "SoapHead", "attach",
           "check_backbone", "load"]


def load(path) -> "CorrectionSet":
    """The corrections of a file written by ``soapvit fit``."""
    return CorrectionSet.load(path)


from .file import CorrectionSet  # noqa: E402  (file.py reads METHODS)
