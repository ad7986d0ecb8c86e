"""Information flow: how concentrated the CLS token's attention over the patches is, per block.

For block ``l`` and head ``h`` the CLS row of the attention matrix restricted to the patch
columns and renormalised, ``π = A[0, P:] / Σ A[0, P:]`` (``P`` prefix tokens), gives
  - its entropy ``H(π) = −Σ π_n log π_n`` (nats; ``log N`` for uniform attention over N patches);
  - ``count90``: the fewest patches whose attention sums to at least 90 % of the mass;
  - ``patch_mass``: ``Σ A[0, P:]``, the share of CLS attention that goes to patches at all.
Each is averaged over heads and images. The same entropy and count describe AbMILP weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..data.sources import ImageSource
from ..data.transforms import ImageTransform
from ..errors import SoapvitError
from ..features import iter_tokens
from ..runlog import Progress, RunLog, RunReport


def distribution_statistics(weights: Tensor, mass: float = 0.9) -> tuple[Tensor, Tensor]:
    """Entropy (nats) and the number of largest entries holding ``mass`` of each distribution
    along the last axis; ``weights`` must sum to 1 there."""
    entropy = -torch.special.xlogy(weights, weights).sum(dim=-1)
    ordered = weights.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    # tolerance: a distribution that sums to 1 − 1e-7 must still reach a mass of 1.0
    count = (ordered < mass - 1e-6).sum(dim=-1) + 1
    return entropy, count.clamp(max=weights.shape[-1])


def cls_attention_statistics(attention: Tensor, num_prefix: int, mass: float = 0.9) -> dict[str, Tensor]:
    """Per image and head ``(B, heads)``: entropy, count90 and patch mass of the CLS row of
    ``attention (B, heads, N_total, N_total)`` over the patch columns."""
    if num_prefix < 1:
        raise SoapvitError("CLS attention statistics need a backbone with a CLS token")
    row = attention[:, :, 0, num_prefix:].double()
    patch_mass = row.sum(dim=-1)
    entropy, count = distribution_statistics(row / patch_mass.clamp_min(1e-12)[..., None], mass)
    return {"entropy": entropy, "count90": count.double(), "patch_mass": patch_mass}


STATISTICS = ("entropy", "count90", "patch_mass")


@dataclass
class AttentionProfile(RunReport):
    """Per-block means over images and heads, for one model: ``results[statistic]`` is a list
    over blocks for each of :data:`STATISTICS`."""

    model_id: str = ""
    num_patches: int = 0
    images: int = 0

    kind = "attention"

    @property
    def max_entropy(self) -> float:
        return math.log(self.num_patches)

    def to_dict(self) -> dict:
        return super().to_dict() | {"max_entropy": self.max_entropy}


def attention_profile(backbone: Backbone, data: ImageSource, *, image_size: int, batch_size: int = 32,
                      num_workers: int | None = None, progress: Progress | None = None) -> AttentionProfile:
    """CLS-attention statistics of every block, averaged over the images of ``data``."""
    blocks = list(range(backbone.num_blocks))
    sums = {k: torch.zeros(len(blocks), dtype=torch.float64) for k in STATISTICS}
    log, n = RunLog(), 0
    transform = ImageTransform.for_backbone(backbone, size=image_size, mode="square")
    for batch in iter_tokens(backbone, data, transform, blocks="last", attentions="all", batch_size=batch_size,
                             num_workers=num_workers, log=log, progress=progress, stage="attention"):
        attentions = batch.original.attentions
        if len(attentions) != len(blocks):
            raise SoapvitError(f"{backbone.model_id} does not return attention maps")
        for b in blocks:
            stats = cls_attention_statistics(attentions[b].cpu(), backbone.num_prefix_tokens)
            for k, v in stats.items():
                sums[k][b] += v.mean(dim=1).sum()
        n += len(batch.indices)
    if n == 0:
        raise SoapvitError(f"--images: no image could be read; first problems: {'; '.join(log.lines()[:3])}")
    side = transform.output_size(1, 1)[0] // backbone.patch_size
    return AttentionProfile(results={k: (sums[k] / n).tolist() for k in STATISTICS},
                            settings={"model": backbone.model_id, "image_size": image_size}, log=log,
                            model_id=backbone.model_id, num_patches=side * side, images=n)
