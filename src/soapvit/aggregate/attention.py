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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..errors import SoapvitError
from ..features import encode
from .datasets import LabelledImages, to_pixels


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


@dataclass
class AttentionProfile:
    """Per-block means over images and heads, for one model."""

    model_id: str
    num_patches: int
    entropy: list[float]
    count90: list[float]
    patch_mass: list[float]
    images: int

    @property
    def max_entropy(self) -> float:
        return math.log(self.num_patches)

    def to_dict(self) -> dict:
        return asdict(self) | {"max_entropy": self.max_entropy}


def attention_profile(backbone: Backbone, data: LabelledImages, *, image_size: int, batch_size: int = 32,
                      progress: Callable[[str, int, int], None] | None = None) -> AttentionProfile:
    """CLS-attention statistics of every block, averaged over ``data``."""
    blocks = list(range(backbone.num_blocks))
    sums = {k: torch.zeros(len(blocks), dtype=torch.float64) for k in ("entropy", "count90", "patch_mass")}
    n = len(data)
    for start in range(0, n, batch_size):
        batch = data.images[start : start + batch_size]
        pixels = to_pixels(batch, image_size, backbone.image_mean, backbone.image_std).to(backbone.device)
        feats = encode(backbone, pixels, "last", attentions="all")
        if len(feats.attentions) != len(blocks):
            raise SoapvitError(f"{backbone.model_id} does not return attention maps")
        for b in blocks:
            stats = cls_attention_statistics(feats.attentions[b].cpu(), backbone.num_prefix_tokens)
            for k, v in stats.items():
                sums[k][b] += v.mean(dim=1).sum()
        if progress:
            progress("attention", min(n, start + batch_size), n)
    side = image_size // backbone.patch_size
    return AttentionProfile(backbone.model_id, side * side, *((sums[k] / n).tolist() for k in sums), images=n)


def plot_profiles(profiles: list[AttentionProfile], path: str | Path, abmilp: dict[str, dict] | None = None) -> Path:
    """Entropy (as a fraction of ``log N``) and count90 (as a fraction of N) per block, one line
    per model; AbMILP weight statistics (``abmilp[model_id] = {"entropy", "count90"}``) as a
    marker after the last block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for profile in profiles:
        x = list(range(1, len(profile.entropy) + 1))
        ent = [e / profile.max_entropy for e in profile.entropy]
        cnt = [c / profile.num_patches for c in profile.count90]
        line = axes[0].plot(x, ent, marker="o", ms=3, label=f"{profile.model_id} (N={profile.num_patches})")[0]
        axes[1].plot(x, cnt, marker="o", ms=3, color=line.get_color())
        extra = (abmilp or {}).get(profile.model_id)
        if extra:
            axes[0].plot([x[-1] + 1], [extra["entropy"] / profile.max_entropy], marker="*", ms=12,
                         color=line.get_color(), linestyle="none")
            axes[1].plot([x[-1] + 1], [extra["count90"] / profile.num_patches], marker="*", ms=12,
                         color=line.get_color(), linestyle="none")
    axes[0].set(xlabel="block", ylabel="CLS→patch attention entropy / log N", ylim=(0, 1.05),
                title="entropy (1 = uniform over patches)")
    axes[1].set(xlabel="block", ylabel="patches holding 90% of CLS attention / N", ylim=(0, 1.05),
                title="90%-mass patch share")
    if abmilp:
        axes[0].annotate("★ = AbMILP weights", xy=(0.02, 0.03), xycoords="axes fraction", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
