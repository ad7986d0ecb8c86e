"""``high-norm``: repair high-norm outlier tokens (the criterion of Darcet et al., ICLR 2024,
"Vision Transformers Need Registers").

A token whose L2 norm exceeds ``threshold_`` is replaced by the mean of its normal tokens among
its 8 grid neighbours; with none, by the mean of every normal token of the image; an image
without normal tokens is left as it is. ``threshold`` None takes the robust rule
``median + z · 1.4826 · MAD`` of the fit's norm histogram (bins at their geometric centres).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SoapvitError
from ..stats import FitStatistics, NormHistogram
from ..validation import POSITIVE, Interval
from .base import Correction

MAD_SCALE = 1.4826
"""MAD × this estimates a normal distribution's standard deviation."""


def weighted_median(values: Tensor, counts: Tensor) -> float:
    """The lower median of ``values`` each repeated ``counts`` times."""
    order = torch.argsort(values)
    cumulative = counts[order].cumsum(0).double()
    if cumulative[-1] <= 0:
        raise ValueError("no norms were counted")
    return float(values[order][torch.searchsorted(cumulative, cumulative[-1] / 2)])


def robust_threshold(hist: NormHistogram, z: float) -> float:
    """``median + z · 1.4826 · MAD`` of the norms counted in ``hist``."""
    edges = hist.edges()
    centres, counts = (edges[:-1] * edges[1:]).sqrt(), hist.counts.cpu()
    median = weighted_median(centres, counts)
    return median + z * MAD_SCALE * weighted_median((centres - median).abs(), counts)


NEIGHBOURS = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


class HighNormRepair(Correction):
    """Replace outlier-norm tokens by the mean of their normal neighbours (see module doc)."""

    method = "high-norm"
    requires = frozenset({"norms"})
    fitted = ("threshold_",)
    constraints = {"threshold": Interval(float, 0, open_low=True, optional=True), "z": POSITIVE}
    source = "Darcet et al., ICLR 2024 (Vision Transformers Need Registers): the high-norm criterion"

    threshold_: Tensor  # ()

    def __init__(self, threshold: float | None = None, z: float = 6.0) -> None:
        self.threshold, self.z = threshold, z
        super().__init__()

    def fit(self, stats: FitStatistics, block: int) -> HighNormRepair:
        s = stats.blocks[block]
        if self.threshold is None:
            if s.norms is None:
                raise SoapvitError(f"high-norm: the fit holds no norm histogram for block {block}")
            value = robust_threshold(s.norms, self.z)
        else:
            value = float(self.threshold)
        self.threshold_ = torch.tensor(value, dtype=torch.float32)
        self.block_, self.dim_ = block, int(s.moments.dim)
        return self

    def transform(self, tokens: Tensor) -> Tensor:
        x = tokens.to(torch.promote_types(tokens.dtype, torch.float32)).permute(0, 3, 1, 2)  # (B, D, h, w)
        normal = (x.norm(dim=1, keepdim=True) <= self.threshold_.to(x.device)).to(x.dtype)  # (B, 1, h, w)
        kernel = NEIGHBOURS.to(x.device, x.dtype)[None, None]
        kept = x * normal
        sums = F.conv2d(kept, kernel.expand(x.shape[1], 1, 3, 3), padding=1, groups=x.shape[1])
        counts = F.conv2d(normal, kernel, padding=1)
        n_normal = normal.sum(dim=(2, 3), keepdim=True)
        image_mean = kept.sum(dim=(2, 3), keepdim=True) / n_normal.clamp_min(1)
        repaired = torch.where(counts > 0, sums / counts.clamp_min(1), image_mean)
        out = torch.where((normal == 0) & (n_normal > 0), repaired, x)
        return out.permute(0, 2, 3, 1).to(tokens.dtype)
