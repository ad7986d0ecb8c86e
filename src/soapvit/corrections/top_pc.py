"""``top-pc``: "all-but-the-top" (Mu & Viswanath, ICLR 2018, "All-but-the-Top: Simple and
Effective Postprocessing for Word Representations").

``z̃ = z − μ − Σ_{i≤k} (u_iᵀ (z − μ)) u_i`` with ``μ`` the fit's mean token and ``u_i`` the ``k``
largest-eigenvalue principal components: the output is centred, as in the paper.
"""

from __future__ import annotations

from torch import Tensor

from ..stats import FitStatistics
from ..validation import COUNT
from .base import Correction


class TopComponents(Correction):
    """Centre, then remove the top-``k`` principal components (see module doc)."""

    method = "top-pc"
    requires = frozenset({"moments"})
    fitted = ("mean_", "components_")
    constraints = {"k": COUNT}
    source = "Mu & Viswanath, ICLR 2018 (all-but-the-top)"

    mean_: Tensor  # (D,)
    components_: Tensor  # (D, k)

    def __init__(self, k: int = 2) -> None:
        self.k = k
        super().__init__()

    def fit(self, stats: FitStatistics, block: int) -> TopComponents:
        s = stats.blocks[block]
        self.mean_ = s.moments.mean.float()
        self.components_ = s.eigenvectors[:, : self.k].float()
        self.block_, self.dim_ = block, int(self.mean_.numel())
        return self

    def transform(self, tokens: Tensor) -> Tensor:
        centred = tokens - self.mean_.to(tokens.device, tokens.dtype)
        u = self.components_.to(tokens.device, tokens.dtype)
        return centred - (centred @ u) @ u.T
