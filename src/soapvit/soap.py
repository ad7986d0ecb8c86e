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

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .backbones.base import Backbone, Features, RawOutput
from .errors import SoapvitError
from .safetensors_io import read_safetensors
from .stats import ResponseCounts, StreamingMoments, positional_fraction
from .validation import POSITIVE, Interval, Options, check_each, validate

VARIANTS = ("reference", "paper")
WEIGHTINGS = ("reference", "paper", "si", "manual")
RESPONSE_RULE = {"reference": "centred", "paper": "raw"}
SOAP_CONSTRAINTS = {
    "variant": Options(VARIANTS), "weighting": Options(WEIGHTINGS), "mu": Interval(float, 0, optional=True),
    "tau": POSITIVE, "alpha": POSITIVE, "gamma": POSITIVE, "threshold": Interval(float, 0, 1),
}
HEAD_FORMAT = "soapvit-head/1"
COMPACT_FIELDS = ("eigenvectors", "p_real", "q_synthetic", "position_mean")  # stored in float32 to keep files small


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


def without_degenerate(scores: Tensor, eigenvalues: Tensor, eps: float = 1e-6, relative: float = 1e-9) -> Tensor:
    """SI set to ``eps`` for components without variance (eigenvalue ≤ ``relative`` × the largest):
    e.g. the direction LayerNorm removes, whose response signs are rounding noise. Such a
    component carries nothing to remove, so it must never rank among the noise components."""
    degenerate = eigenvalues.to(scores.device) <= relative * eigenvalues.max()
    return torch.where(degenerate, torch.full_like(scores, eps), scores)


def descending_rank(scores: Tensor) -> Tensor:
    """0-indexed rank of each score in descending order (ties broken by index)."""
    order = torch.argsort(scores, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(scores.numel(), device=scores.device)
    return rank


def auto_mu(scores: Tensor, threshold: float = 0.75) -> int:
    """Number of components with SI above ``threshold`` (the reference's ``μ=None``)."""
    return int((scores > threshold).sum())


def component_weights(scores: Tensor, weighting: str = "reference", mu: float | None = 2.0, tau: float = 0.05,
                      components: Sequence[int] = (), threshold: float = 0.75) -> Tensor:
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
class BlockStatistics:
    """Everything one pass over the data gives for one block."""

    moments: StreamingMoments
    eigenvalues: Tensor
    eigenvectors: Tensor
    real: ResponseCounts
    synthetic: ResponseCounts
    position_mean: Tensor  # (h, w, D) mean real token per patch position


@dataclass
class SoapConfig:
    """Scoring and weighting settings."""

    variant: str = "reference"
    weighting: str | None = None  # defaults to the variant
    mu: float | None = 2.0
    tau: float = 0.05
    alpha: float = 2.0
    gamma: float = 1.0
    threshold: float = 0.75
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


class SoapHead(nn.Module):
    """The training-free linear head ``ẑ = P z`` for one block, plus every fitted block's
    decomposition and the fit's metadata."""

    def __init__(self, blocks: dict[int, BlockDecomposition], apply_block: int, metadata: dict) -> None:
        super().__init__()
        if apply_block not in blocks:
            raise SoapvitError(f"--apply-block {apply_block} was not fitted; fitted blocks: {sorted(blocks)}")
        self.blocks = blocks
        self.apply_block = apply_block
        self.metadata = dict(metadata)
        self.register_buffer("projector", projector(blocks[apply_block].eigenvectors, blocks[apply_block].weights).float())

    @classmethod
    def from_statistics(cls, stats: dict[int, BlockStatistics], config: SoapConfig, apply_block: int,
                        metadata: dict | None = None) -> SoapHead:
        """Score every block and build the head for ``apply_block``."""
        blocks = {}
        for b, s in stats.items():
            si = without_degenerate(si_scores(s.real, s.synthetic, config.variant, config.alpha, config.gamma),
                                    s.eigenvalues)
            weights = component_weights(si, config.weighting, config.mu, config.tau, config.remove, config.threshold)
            rule = RESPONSE_RULE[config.variant]
            blocks[b] = BlockDecomposition(
                mean=s.moments.mean, eigenvalues=s.eigenvalues, eigenvectors=s.eigenvectors, si=si,
                weights=weights, p_real=s.real.probabilities(rule), q_synthetic=s.synthetic.probabilities(rule),
                position_share=positional_fraction(s.position_mean, s.moments.mean, s.eigenvectors, s.eigenvalues),
                position_mean=s.position_mean,
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

    forward = transform

    def transform_sequence(self, sequence: Tensor, num_prefix: int) -> Tensor:
        """Apply ``P`` to the patch tokens of ``(B, P + N, D)``, leaving the ``P`` prefix tokens."""
        return torch.cat([sequence[:, :num_prefix], self.transform(sequence[:, num_prefix:])], dim=1)

    def correct(self, features: Features) -> Features:
        """Features of an output head (at the last block) from the original ones: the head's block
        transformed, nothing else (keys are computed inside the block, before its output)."""
        tokens = dict(features.tokens)
        if self.apply_block in tokens:
            tokens[self.apply_block] = self.transform(tokens[self.apply_block])
        return Features(tokens=tokens, prefix=features.prefix, keys=features.keys, attentions=features.attentions)

    def digest(self) -> str:
        """Short content digest of the projector and the block it applies to."""
        from .backbones.wheels import tensor_digest

        return tensor_digest({"projector": self.projector, "apply_block": torch.tensor(self.apply_block)})[:16]

    def positional_offset(self, block: int, grid: tuple[int, int]) -> Tensor | None:
        """The mean token per patch position minus the mean token, ``(h, w, D)``, resampled
        (bilinear) to ``grid``: the positional signal the fit measured at ``block``; None when the
        head has no such statistics."""
        d = self.blocks.get(block)
        if d is None or d.position_mean is None:
            return None
        offset = (d.position_mean - d.mean).float().permute(2, 0, 1)[None]
        if tuple(offset.shape[-2:]) != tuple(grid):
            offset = torch.nn.functional.interpolate(offset, size=grid, mode="bilinear", align_corners=False)
        return offset[0].permute(1, 2, 0)

    def check_backbone(self, backbone: Backbone, *, allow_other: bool = False) -> None:
        """Refuse a backbone the head was not fitted for: another width always; another model id
        or weights unless ``allow_other``."""
        if self.projector.shape[0] != backbone.embed_dim:
            raise SoapvitError(f"the head has dimension {self.projector.shape[0]} but {backbone.model_id} has "
                               f"{backbone.embed_dim}")
        if self.apply_block >= backbone.num_blocks:
            raise SoapvitError(f"the head applies to block {self.apply_block} but {backbone.model_id} has "
                               f"{backbone.num_blocks} blocks")
        fitted = self.metadata.get("backbone")
        if allow_other or fitted is None:
            return
        if fitted != backbone.model_id:
            raise SoapvitError(f"the head was fitted for {fitted}, not {backbone.model_id} "
                               "(--allow-other-backbone to apply it anyway)")
        digest = self.metadata.get("weights_digest")
        if digest is not None and digest != backbone.weights_digest():
            raise SoapvitError(f"the head was fitted for other weights of {fitted} (digest {digest}, these "
                               f"{backbone.weights_digest()}; --allow-other-backbone to apply it anyway)")

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file: tensors per block plus JSON metadata."""
        tensors = {"projector": self.projector.contiguous()}
        for b, d in self.blocks.items():
            for name in BlockDecomposition.__dataclass_fields__:
                if getattr(d, name) is None:
                    continue
                value = getattr(d, name).detach().cpu()
                if name in COMPACT_FIELDS:
                    value = value.float()
                tensors[f"block.{b}.{name}"] = value.contiguous()
        meta = {"format": HEAD_FORMAT, "apply_block": str(self.apply_block),
                "blocks": json.dumps(sorted(self.blocks)), "metadata": json.dumps(self.metadata)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        save_file({k: v.cpu() for k, v in tensors.items()}, str(partial), metadata=meta)
        os.replace(partial, path)  # a killed save never leaves a half-written head behind
        return path

    @classmethod
    def load(cls, path: str | Path) -> SoapHead:
        """Read a head file written by :meth:`save`."""
        tensors, meta = read_safetensors(path, "head file")
        if meta.get("format") != HEAD_FORMAT:
            raise SoapvitError(f"{path} is not a SOAP head file (format {meta.get('format')!r})")
        try:
            blocks = {
                b: BlockDecomposition(**{n: tensors[f"block.{b}.{n}"].double() for n in BlockDecomposition.__dataclass_fields__
                                         if f"block.{b}.{n}" in tensors or n != "position_mean"})
                for b in json.loads(meta["blocks"])
            }
            metadata = json.loads(meta["metadata"])
            metadata["auto_mu"] = {int(k): v for k, v in metadata.get("auto_mu", {}).items()}
            metadata.setdefault("blocks", metadata.pop("layers", sorted(blocks)))  # files before the rename
            apply_block = int(meta.get("apply_block", meta.get("apply_layer")))
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise SoapvitError(f"head file {path} is incomplete or damaged ({type(err).__name__}: {err})") from None
        return cls(blocks, apply_block, metadata)

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


class SoapBackbone(Backbone):
    """A backbone with a SOAP head in its forward pass, by one rule: a head at the last block
    transforms the output tokens; a head at an earlier block replaces that block's patch tokens
    (the residual stream) by their projection, so every later block sees the corrected tokens."""

    def __init__(self, backbone: Backbone, head: SoapHead) -> None:
        desc = backbone.describe()
        desc.pop("model_id")
        super().__init__(f"{backbone.model_id}+soap", **desc)
        head.check_backbone(backbone)
        self.backbone = backbone
        self.head = head

    def block_modules(self):
        return self.backbone.block_modules()

    def _run(self, pixels, blocks, norm, keys, attentions, edits) -> RawOutput:
        b = self.head.apply_block
        if b == self.num_blocks - 1:
            raw = self.backbone._run(pixels, blocks, norm, keys, attentions, edits)
            if b in raw.hidden:
                raw.hidden[b] = self.head.transform_sequence(raw.hidden[b], self.num_prefix_tokens)
            return raw
        edit = lambda seq: self.head.transform_sequence(seq, self.num_prefix_tokens)  # noqa: E731
        return self.backbone._run(pixels, blocks, norm, keys, attentions, {**edits, b: edit})


def attach(backbone: Backbone, head: SoapHead) -> SoapBackbone:
    """Wrap ``backbone`` so that its forward pass applies ``head`` (see :class:`SoapBackbone`)."""
    return SoapBackbone(backbone, head)
