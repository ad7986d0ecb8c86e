"""SOAP: semantic-invariance scores, component weights, the projector ``I − V W Vᵀ`` and the head.

Plain tensors in, plain tensors out (Hjelkrem-Tan et al., CVPR 2026: SI score, weights, projector). Two variants:

- ``reference`` (default, the authors' code): centred strict responses, SI per patch position
  averaged over positions, ``w = s · σ((μ − 0.5 − r) / τ)`` with 0-indexed rank ``r``;
- ``paper`` (project page): uncentred ``≥ 0`` responses, SI of the pooled probabilities,
  ``w = s · σ((μ − r) / τ) / σ(μ / τ)`` with 1-indexed rank ``r``.

Weightings beyond the two: ``si`` (every component weighted by its SI, no cut-off) and
``manual`` (the listed components removed with weight 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import SoapvitError
from ..stats import FitStatistics, ResponseCounts
from ..validation import POSITIVE, Interval, Options, check_each, validate
from .base import Correction

VARIANTS = ("reference", "paper")
WEIGHTINGS = ("reference", "paper", "si", "manual")
RESPONSE_RULE = {"reference": "centred", "paper": "raw"}
SOAP_CONSTRAINTS = {
    "variant": Options(VARIANTS), "weighting": Options(WEIGHTINGS), "mu": Interval(float, 0, optional=True),
    "tau": POSITIVE, "alpha": POSITIVE, "gamma": POSITIVE, "threshold": Interval(float, 0, 1),
}
COMPACT_FIELDS = ("eigenvectors", "p_real", "q_synthetic", "position_mean")  # stored in float32 to keep files small
SI_THRESHOLD = 0.75
"""SI at or above which a component counts as non-semantic (the SOAP paper's 0.75)."""
REMOVED_WEIGHT = 0.5
"""A component whose weight exceeds this is removed (more than half of it is projected out)."""


def semantic_invariance(p: Tensor, q: Tensor, alpha: float = 2.0, gamma: float = 1.0, eps: float = 1e-6) -> Tensor:
    """``s = 2 (pq + (1−p)(1−q))^γ / (‖(p, 1−p)‖_α + ‖(q, 1−q)‖_α)``, clamped to (ε, 1−ε).

    Elementwise over any shape; ``p``/``q`` are response probabilities on real/synthetic images.
    """
    p, q = p.double(), q.double()
    agreement = (p * q + (1 - p) * (1 - q)).pow(gamma)
    norm_p = (p.pow(alpha) + (1 - p).pow(alpha)).pow(1 / alpha)
    norm_q = (q.pow(alpha) + (1 - q).pow(alpha)).pow(1 / alpha)
    return (2 * agreement / (norm_p + norm_q)).clamp(eps, 1 - eps)


def si_scores(real: ResponseCounts, synthetic: ResponseCounts, variant: str = "reference",
              alpha: float = 2.0, gamma: float = 1.0) -> Tensor:
    """SI per component ``(D,)`` from response counts, by ``variant``."""
    validate({"variant": variant}, SOAP_CONSTRAINTS)
    rule = RESPONSE_RULE[variant]
    p, q = real.probabilities(rule), synthetic.probabilities(rule)
    if variant == "reference":
        return semantic_invariance(p, q, alpha, gamma).mean(dim=(0, 1))
    return semantic_invariance(p.mean(dim=(0, 1)), q.mean(dim=(0, 1)), alpha, gamma)


def degenerate(eigenvalues: Tensor, relative: float = 1e-9) -> Tensor:
    """Mask of the components without variance (eigenvalue ≤ ``relative`` × the largest): e.g. the
    direction a final LayerNorm removes, whose response signs are rounding noise."""
    return eigenvalues <= relative * eigenvalues.max()


def without_degenerate(scores: Tensor, eigenvalues: Tensor, eps: float = 1e-6, relative: float = 1e-9) -> Tensor:
    """SI set to ``eps`` for the :func:`degenerate` components: such a component carries nothing to
    remove, so it must never rank among the noise components."""
    return torch.where(degenerate(eigenvalues, relative).to(scores.device), torch.full_like(scores, eps), scores)


def descending_rank(scores: Tensor) -> Tensor:
    """0-indexed rank of each score in descending order (ties broken by index)."""
    order = torch.argsort(scores, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(scores.numel(), device=scores.device)
    return rank


def high_si(scores: Tensor, threshold: float = SI_THRESHOLD) -> Tensor:
    """Indices of the components with SI ≥ ``threshold`` (the one rule for "high SI")."""
    return (scores >= threshold).nonzero().flatten()


def removed(weights: Tensor) -> list[int]:
    """Indices of the components a weight vector removes (weight > :data:`REMOVED_WEIGHT`)."""
    return (weights > REMOVED_WEIGHT).nonzero().flatten().tolist()


def auto_mu(scores: Tensor, threshold: float = SI_THRESHOLD) -> int:
    """Number of high-SI components (:func:`high_si`; the reference's ``μ=None``)."""
    return int(high_si(scores, threshold).numel())


def component_weights(scores: Tensor, weighting: str = "reference", mu: float | None = 2.0, tau: float = 0.05,
                      components: Sequence[int] = (), threshold: float = SI_THRESHOLD) -> Tensor:
    """Diagonal of ``W`` for each weighting (see module doc); ``mu=None`` → :func:`auto_mu`."""
    validate({"weighting": weighting}, SOAP_CONSTRAINTS)
    scores = scores.double()
    if weighting == "manual":
        weights = torch.zeros_like(scores)
        for c in components:
            if not 0 <= c < scores.numel():
                raise SoapvitError(f"--remove: component {c} is out of range 0..{scores.numel() - 1}")
            weights[c] = 1.0
        return weights
    if weighting == "si":
        return scores.clone()
    mu = auto_mu(scores, threshold) if mu is None else float(mu)
    rank = descending_rank(scores).double()
    if weighting == "reference":
        return scores * torch.sigmoid((mu - 0.5 - rank) / tau)
    rank = rank + 1
    return scores * torch.sigmoid((mu - rank) / tau) / torch.sigmoid(torch.tensor(mu / tau, dtype=torch.float64))


def projector(eigenvectors: Tensor, weights: Tensor) -> Tensor:
    """``P = I − V diag(w) Vᵀ``: symmetric; idempotent when ``w`` is binary."""
    v = eigenvectors.double()
    return torch.eye(v.shape[0], dtype=torch.float64, device=v.device) - (v * weights.double()) @ v.T


@dataclass
class SoapConfig:
    """Scoring and weighting settings."""

    variant: str = "reference"
    weighting: str | None = None  # defaults to the variant
    mu: float | None = 2.0
    tau: float = 0.05
    alpha: float = 2.0
    gamma: float = 1.0
    threshold: float = SI_THRESHOLD
    remove: Sequence[int] = ()

    def __post_init__(self) -> None:
        self.weighting = self.weighting or ("manual" if self.remove else self.variant)
        validate(self.__dict__, SOAP_CONSTRAINTS)
        check_each("remove", self.remove, Interval(int, 0))
        if self.weighting == "manual" and not self.remove:
            raise SoapvitError("--weighting manual needs --remove (the components to remove)")


@dataclass
class BlockDecomposition:
    """Per block: PCA, SI and weights, kept for diagnosis."""

    mean: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    si: Tensor
    weights: Tensor
    p_real: Tensor  # (h, w, D) response probabilities
    q_synthetic: Tensor
    position_share: Tensor  # (D,) variance share explained by patch position
    position_mean: Tensor | None = None  # (h, w, D) mean real token per position (absent in old files)


class SoapHead(Correction):
    """The training-free linear head ``ẑ = P z`` for one block, plus every fitted block's
    decomposition (for diagnosis) and the fit's metadata (Hjelkrem-Tan et al., CVPR 2026)."""

    method = "soap"
    requires = frozenset({"moments", "responses", "positions"})
    source = "Hjelkrem-Tan et al., CVPR 2026 (SOAP)"

    def __init__(self, blocks: dict[int, BlockDecomposition], apply_block: int, metadata: dict) -> None:
        if apply_block not in blocks:
            raise SoapvitError(f"--apply-block {apply_block} was not fitted; fitted blocks: {sorted(blocks)}")
        self.blocks = blocks
        self.apply_block = apply_block
        self.metadata = dict(metadata)
        self.projector = projector(blocks[apply_block].eigenvectors, blocks[apply_block].weights).float()

    CONFIG_FIELDS: ClassVar[tuple[str, ...]] = ("variant", "weighting", "mu", "tau", "alpha", "gamma", "threshold",
                                                "remove")

    @property
    def block_(self) -> int:
        return self.apply_block

    @property
    def dim_(self) -> int:
        return self.projector.shape[0]

    def get_params(self) -> dict:
        return {k: self.metadata.get(k) for k in self.CONFIG_FIELDS}

    def check_params(self) -> None:  # checked by SoapConfig
        pass

    @classmethod
    def from_statistics(cls, stats: FitStatistics, config: SoapConfig, apply_block: int,
                        metadata: dict | None = None) -> SoapHead:
        """Score every block and build the head for ``apply_block``."""
        blocks = {}
        for b, s in stats.blocks.items():
            si = without_degenerate(si_scores(s.real, s.synthetic, config.variant, config.alpha, config.gamma),
                                    s.eigenvalues)
            weights = component_weights(si, config.weighting, config.mu, config.tau, config.remove, config.threshold)
            rule = RESPONSE_RULE[config.variant]
            blocks[b] = BlockDecomposition(
                mean=s.moments.mean, eigenvalues=s.eigenvalues, eigenvectors=s.eigenvectors, si=si,
                weights=weights, p_real=s.real.probabilities(rule), q_synthetic=s.synthetic.probabilities(rule),
                position_share=s.position_share, position_mean=s.position_mean,
            )
        meta = dict(metadata or {})
        meta.update(variant=config.variant, weighting=config.weighting, mu=config.mu, tau=config.tau,
                    alpha=config.alpha, gamma=config.gamma, threshold=config.threshold, remove=list(config.remove),
                    auto_mu={b: auto_mu(d.si, config.threshold) for b, d in blocks.items()})
        return cls(blocks, apply_block, meta)

    def reweighted(self, config: SoapConfig, apply_block: int | None = None) -> SoapHead:
        """The same decomposition with other weights (scores are kept; the variant must match)."""
        if config.variant != self.metadata.get("variant"):
            raise SoapvitError("changing --variant needs the response counts: fit again")
        blocks = {}
        for b, d in self.blocks.items():
            w = component_weights(d.si, config.weighting, config.mu, config.tau, config.remove, config.threshold)
            blocks[b] = BlockDecomposition(d.mean, d.eigenvalues, d.eigenvectors, d.si, w, d.p_real, d.q_synthetic,
                                           d.position_share, d.position_mean)
        meta = dict(self.metadata)
        meta.update(weighting=config.weighting, mu=config.mu, tau=config.tau, remove=list(config.remove))
        return SoapHead(blocks, self.apply_block if apply_block is None else apply_block, meta)

    def transform(self, tokens: Tensor) -> Tensor:
        """Apply ``P`` on the last dimension of ``tokens`` (no centring, as the reference)."""
        return tokens @ self.projector.to(tokens.device, tokens.dtype)

    def digest(self) -> str:
        """Short content digest of the projector and the block it applies to."""
        from ..backbones.wheels import tensor_digest

        return tensor_digest({"projector": self.projector, "apply_block": torch.tensor(self.apply_block)})[:16]

    # -- persistence: the SOAP tensors sit at the top of a corrections file ---------------------
    def state(self) -> dict[str, Tensor]:
        tensors = {"projector": self.projector.contiguous()}
        for b, d in self.blocks.items():
            for name in BlockDecomposition.__dataclass_fields__:
                if getattr(d, name) is None:
                    continue
                value = getattr(d, name).detach().cpu()
                if name in COMPACT_FIELDS:
                    value = value.float()
                tensors[f"block.{b}.{name}"] = value.contiguous()
        return tensors

    def describe(self) -> dict:
        return {"method": self.method, "params": self.get_params(), "block": self.apply_block, "dim": self.dim_,
                "blocks": sorted(self.blocks)}

    @classmethod
    def restore(cls, description: dict, tensors: dict[str, Tensor], metadata: dict | None = None) -> SoapHead:
        blocks = {
            b: BlockDecomposition(**{n: tensors[f"block.{b}.{n}"].double() for n in BlockDecomposition.__dataclass_fields__
                                     if f"block.{b}.{n}" in tensors or n != "position_mean"})
            for b in description["blocks"]
        }
        metadata = dict(metadata or {})
        metadata["auto_mu"] = {int(k): v for k, v in metadata.get("auto_mu", {}).items()}
        return cls(blocks, int(description["block"]), metadata)

    def save(self, path: str | Path) -> Path:
        """Write this head alone as a corrections file (:mod:`soapvit.corrections.file`)."""
        from .file import CorrectionSet

        return CorrectionSet({"soap": self}, self.metadata).save(path)

    @classmethod
    def load(cls, path: str | Path) -> SoapHead:
        """The SOAP head of a corrections file."""
        from .file import CorrectionSet

        corrections = CorrectionSet.load(path)
        if "soap" not in corrections:
            raise SoapvitError(f"{path} holds no SOAP head (corrections: {', '.join(corrections)})")
        return corrections["soap"]

    def summary(self) -> dict:
        """Plain data: per block eigenvalues, SI and weights in descending-eigenvalue order."""
        return {
            "backbone": self.metadata.get("backbone", ""),
            "apply_block": self.apply_block,
            "blocks": {
                str(b): {"eigenvalues": d.eigenvalues.tolist(), "si": d.si.tolist(), "weights": d.weights.tolist()}
                for b, d in sorted(self.blocks.items())
            },
        }
