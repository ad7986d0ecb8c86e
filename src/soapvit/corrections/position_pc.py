"""``position-pc``: remove the components most explained by patch position (an ablation of SOAP,
Hjelkrem-Tan et al., CVPR 2026: its synthetic-image SI ranking replaced by the position share).

Components are ranked by :attr:`~soapvit.stats.BlockStatistics.position_share` (the share of
their variance explained by patch position; components without variance rank last, as in SOAP)
and the top ``mu`` removed with ``z̃ = (I − V Vᵀ) z``, without centring, like SOAP's ``I − V W Vᵀ``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import FitStatistics
from ..validation import COUNT
from .base import Correction
from .soap import without_degenerate


class PositionComponents(Correction):
    """Project out the ``mu`` most position-explained components (see module doc)."""

    method = "position-pc"
    requires = frozenset({"moments", "positions"})
    fitted = ("components_", "shares_")
    constraints = {"mu": COUNT}
    source = "Hjelkrem-Tan et al., CVPR 2026 (SOAP), ranked by position share instead of SI"

    components_: Tensor  # (D, mu)
    shares_: Tensor  # (mu,)

    def __init__(self, mu: int = 2) -> None:
        self.mu = mu
        super().__init__()

    def fit(self, stats: FitStatistics, block: int) -> PositionComponents:
        s = stats.blocks[block]
        shares = s.position_share
        order = torch.argsort(without_degenerate(shares, s.eigenvalues), descending=True, stable=True)[: self.mu]
        self.components_ = s.eigenvectors[:, order].float()
        self.shares_ = shares[order].float()
        self.block_, self.dim_ = block, int(s.eigenvectors.shape[0])
        return self

    def transform(self, tokens: Tensor) -> Tensor:
        v = self.components_.to(tokens.device, tokens.dtype)
        return tokens - (tokens @ v) @ v.T
