"""Pooling heads on frozen ViT tokens and the probe classifier behind them (Beyond [cls], gmum/beyond_cls: AbMILP pooling).

Every pool maps ``(prefix (B, P, D), patches (B, N, D))`` to ``(pooled (B, D), weights (B, N) or
None)``: :class:`ClsPool` takes the CLS token, :class:`MeanPool` averages the patches,
:class:`AbMILPPool` learns a softmax weight per patch (attention-based MIL pooling). A
:class:`ProbeClassifier` puts ``BatchNorm(affine=False)`` and a linear layer on top (the MAE
linear-probe head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SoapvitError
from ..validation import COUNT, Options, validate

POOLS = ("cls", "mean", "abmilp")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
SELF_ATTENTION = ("none", "map", "both")
CONDITIONING = ("none", "pe")
ABMILP_CONSTRAINTS = {
    "abmilp_depth": COUNT, "abmilp_activation": Options(tuple(ACTIVATIONS)),
    "abmilp_self_attention": Options(SELF_ATTENTION), "abmilp_conditioning": Options(CONDITIONING),
}


def sincos_position_embedding(height: int, width: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos embedding ``(height*width, dim)``, row-major: the first half of the
    channels encodes the row, the second half the column; each half is ``[sin(p·ω), cos(p·ω)]``
    with ``ω_i = 10000^(−i/(dim/4))``. Channels beyond a multiple of 4 are zero."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                torch.arange(width, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angles = pos[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1])).float()


class ClsPool(nn.Module):
    """The first prefix token (CLS)."""

    def forward(self, prefix: Tensor, patches: Tensor) -> tuple[Tensor, None]:
        if prefix.shape[1] == 0:
            raise SoapvitError("--pool cls: this backbone has no CLS token")
        return prefix[:, 0], None


class MeanPool(nn.Module):
    """Mean of the patch tokens."""

    def forward(self, prefix: Tensor, patches: Tensor) -> tuple[Tensor, None]:
        return patches.mean(dim=1), None


class SelfAttention(nn.Module):
    """One-head self-attention with an output projection (the optional AbMILP pre-step)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(F.scaled_dot_product_attention(q, k, v))


class AbMILPPool(nn.Module):
    """Attention-based MIL pooling: ``a_n = MLP(u_n)``, ``w = softmax_n(a)``, ``pooled = Σ w_n x_n``.

    ``depth`` counts the MLP's linear layers: ``depth − 1`` hidden ``D→D`` layers with
    ``activation``, then ``D→1`` (depth 1, the published default, is a single linear score).
    ``self_attention``: ``"none"``; ``"map"`` — the scores read a one-head self-attention of the
    patches, the pooled values stay the patches; ``"both"`` — scores and pooled values both use it.
    ``conditioning="pe"`` adds a fixed 2-D sin-cos position embedding to the score input.
    """

    def __init__(self, dim: int, *, depth: int = 1, activation: str = "relu", self_attention: str = "none",
                 conditioning: str = "none", grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        validate({"abmilp_depth": depth, "abmilp_activation": activation, "abmilp_self_attention": self_attention,
                  "abmilp_conditioning": conditioning}, ABMILP_CONSTRAINTS)
        self.self_attention, self.conditioning = self_attention, conditioning
        if conditioning == "pe" and grid is None:
            raise SoapvitError("positional conditioning needs the patch grid")
        self.grid = grid
        self.attention = SelfAttention(dim) if self_attention != "none" else None
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.Linear(dim, dim), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(dim, 1))
        self.scorer = nn.Sequential(*layers)
        if conditioning == "pe":
            self.register_buffer("position", sincos_position_embedding(*grid, dim), persistent=False)

    def scores(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised scores ``(B, N)`` and the tokens they pool ``(B, N, D)``."""
        attended = self.attention(patches) if self.attention is not None else patches
        score_input = attended if self.self_attention in ("map", "both") else patches
        if self.conditioning == "pe":
            if score_input.shape[1] != self.position.shape[0]:
                raise SoapvitError(f"positional conditioning was built for a {self.grid} grid, "
                                   f"got {score_input.shape[1]} patches")
            score_input = score_input + self.position
        values = attended if self.self_attention == "both" else patches
        return self.scorer(score_input).squeeze(-1), values

    def forward(self, prefix: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        logits, values = self.scores(patches)
        weights = logits.softmax(dim=1)
        return torch.einsum("bn,bnd->bd", weights, values), weights


class ProbeClassifier(nn.Module):
    """``pool → BatchNorm1d(affine=False) → Linear`` (linear-probe head of MAE / Beyond [cls])."""

    def __init__(self, pool: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.pool = pool
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def classify(self, pooled: Tensor) -> Tensor:
        """Logits ``(B, classes)`` of pooled vectors ``(B, D)``."""
        return self.linear(self.norm(pooled))

    def forward(self, prefix: Tensor, patches: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits ``(B, classes)`` and the pool's patch weights (or ``None``)."""
        pooled, weights = self.pool(prefix, patches)
        return self.classify(pooled), weights


def make_pool(name: str, dim: int, *, grid: tuple[int, int] | None = None, **abmilp) -> nn.Module:
    """A pool by name (``cls``, ``mean``, ``abmilp``); ``abmilp`` options go to :class:`AbMILPPool`."""
    validate({"pool": name}, {"pool": Options(POOLS)})
    if name == "cls":
        return ClsPool()
    if name == "mean":
        return MeanPool()
    return AbMILPPool(dim, grid=grid, **abmilp)
