"""``zero-subspace``: INSID3's positional debiasing (Cuttano et al., CVPR 2026, repository
visinf/INSID3, ``_build_positional_basis`` and ``_debias_features``).

The zero image's patch tokens (normalised pixels all zero, final norm applied), each L2-normalised,
then centred; ``U`` ``(D, k)``: the top-``k`` left singular vectors of that ``(D, N)`` matrix
(``k`` clipped to its numerical rank, :attr:`~ZeroSubspace.k_`). ``transform``:
``z̃ = (I − U Uᵀ) ẑ`` with ``ẑ = z / ‖z‖``, L2-normalised again as the reference code does
(``renormalise``). Published ``k``: 500 (in-context segmentation, ViT-L), 20 (SPair-71k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SoapvitError
from ..stats import FitStatistics
from ..validation import COUNT, Options
from .base import Correction


class ZeroSubspace(Correction):
    """Project L2-normalised tokens off the zero image's principal subspace (see module doc)."""

    method = "zero-subspace"
    requires = frozenset({"zero_image"})
    fitted = ("basis_",)
    constraints = {"k": COUNT, "renormalise": Options((True, False))}
    source = "Cuttano et al., CVPR 2026 (INSID3): positional debiasing"

    basis_: Tensor  # (D, k_)

    def __init__(self, k: int = 10, renormalise: bool = True) -> None:
        self.k, self.renormalise = k, renormalise
        super().__init__()

    @property
    def k_(self) -> int:
        """The number of directions removed (``k`` clipped to the rank available)."""
        return int(self.basis_.shape[1])

    def fit(self, stats: FitStatistics, block: int) -> ZeroSubspace:
        if block not in stats.zero_image:
            raise SoapvitError(f"zero-subspace: the fit holds no zero-image tokens for block {block}")
        zero = stats.zero_image[block]
        e = F.normalize(zero.reshape(-1, zero.shape[-1]).double(), dim=-1).T  # (D, N)
        e = e - e.mean(dim=1, keepdim=True)
        u, s, _ = torch.linalg.svd(e, full_matrices=False)
        rank = int((s > s.max() * max(e.shape) * torch.finfo(s.dtype).eps).sum())
        if rank == 0:
            raise SoapvitError(f"zero-subspace: the zero image's tokens at block {block} do not vary")
        self.basis_ = u[:, : min(self.k, rank)].float()
        self.block_, self.dim_ = block, int(zero.shape[-1])
        return self

    def transform(self, tokens: Tensor) -> Tensor:
        z = F.normalize(tokens, dim=-1)
        u = self.basis_.to(z.device, z.dtype)
        out = z - (z @ u) @ u.T
        return F.normalize(out, dim=-1) if self.renormalise else out
