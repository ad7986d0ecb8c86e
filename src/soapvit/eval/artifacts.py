"""Artifacts as numbers: how much non-semantic signal each variant's tokens carry, from one pass.

Per variant (``original`` and each correction), over real images at one fixed grid:

- ``position_probe_acc``: held-out accuracy of a linear probe (ridge regression onto one-hot
  patch positions, standardised tokens, images split in halves) that predicts a token's patch
  position; chance is ``1 / (h·w)``. High: the token encodes where it is.
- ``cos_same_position`` / ``cos_other_position``: mean cosine between tokens of different images
  at the same position, and at different positions. A gap means a shared positional component.
- ``high_norm_share``: share of tokens whose norm exceeds the outlier threshold of the original
  tokens (median + ``z``·1.4826·MAD, the ``high-norm`` correction's rule; Darcet et al., ICLR 2024).
- ``effective_rank``: ``exp`` of the entropy of the normalised covariance eigenvalues (Roy and
  Vetterli, 2007): how many directions the tokens really use.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones.base import Backbone
from ..data.sources import ImageSource
from ..data.transforms import ImageTransform
from ..errors import SoapvitError
from ..features import gather_log, iter_tokens
from ..runlog import Progress, RunLog, RunReport
from ..stats import StreamingMoments
from .variants import describe_variant, plan_variants


def effective_rank(eigenvalues: Tensor) -> float:
    """``exp(−Σ p log p)`` with ``p = λ / Σλ`` over the positive eigenvalues."""
    lam = eigenvalues.double().clamp_min(0)
    p = lam[lam > 0] / lam.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def position_probe_accuracy(train: Tensor, test: Tensor, ridge: float = 1e-3) -> float:
    """Held-out accuracy of predicting the position index from tokens ``(n_images, P, D)``: ridge
    regression of standardised tokens onto one-hot positions, argmax."""
    positions = train.shape[1]
    mean, std = train.reshape(-1, train.shape[-1]).mean(0), train.reshape(-1, train.shape[-1]).std(0).clamp_min(1e-6)
    x = ((train - mean) / std).reshape(-1, train.shape[-1]).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = F.one_hot(torch.arange(positions).repeat(train.shape[0]), positions).double()
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(gram, x.T @ y)
    xt = ((test - mean) / std).reshape(-1, test.shape[-1]).double()
    predicted = (torch.cat([xt, torch.ones(len(xt), 1, dtype=xt.dtype)], 1) @ weights).argmax(1)
    return float((predicted == torch.arange(positions).repeat(test.shape[0])).double().mean())


def token_artifacts(tokens: Tensor, threshold: float) -> dict:
    """Cosines, high-norm share and effective rank of tokens ``(n_images, h, w, D)``."""
    n, h, w, d = tokens.shape
    flat = tokens.reshape(n, h * w, d).double()
    unit = F.normalize(flat, dim=-1)
    positions = h * w
    by_position = unit.sum(0)  # (P, D): Σ_i u_ip
    pairs_same = float(by_position.pow(2).sum() - unit.pow(2).sum())  # Σ_p Σ_{i≠j} u_ip·u_jp
    pairs_all = float(by_position.sum(0).pow(2).sum() - unit.sum(1).pow(2).sum())  # Σ_{i≠j} Σ_{p,q} u_ip·u_jq
    moments = StreamingMoments(d).update(flat.reshape(-1, d))
    return {
        "cos_same_position": pairs_same / (n * (n - 1) * positions),
        "cos_other_position": (pairs_all - pairs_same) / (n * (n - 1) * positions * (positions - 1)),
        "high_norm_share": float((flat.norm(dim=-1) > threshold).double().mean()),
        "effective_rank": effective_rank(torch.linalg.eigvalsh(moments.covariance())),
    }


@dataclass
class ArtifactsReport(RunReport):
    passes: dict | None = None

    kind = "artifacts"


def outlier_threshold(norms: Tensor, z: float = 6.0) -> float:
    """``median + z · 1.4826 · MAD`` of ``norms``."""
    median = norms.median()
    return float(median + z * 1.4826 * (norms - median).abs().median())


def measure_artifacts(backbone: Backbone, source: ImageSource, *, corrections: Mapping | None = None,
                      image_size: int | None = None, batch_size: int = 16, z: float = 6.0,
                      num_workers: int | None = None, progress: Progress | None = None) -> ArtifactsReport:
    """The numbers of the module doc for every variant, at the last block, from one pass over
    ``source`` (square inputs of ``image_size``, default the backbone's)."""
    if len(source) < 4:
        raise SoapvitError(f"--images: artifacts need at least 4 images, got {len(source)}")
    start = time.perf_counter()
    log = RunLog()
    corrections, passes = plan_variants(corrections, backbone, reads_keys=False, log=log)
    transform = ImageTransform.for_backbone(backbone, size=image_size or backbone.image_size, mode="square")
    block = backbone.num_blocks - 1
    kept: dict[str, list[Tensor]] = {}
    for batch in iter_tokens(backbone, source, transform, blocks=block, corrections=corrections,
                             batch_size=batch_size, num_workers=num_workers, log=log, progress=progress,
                             stage="artifacts"):
        for name, features in batch.variants.items():
            kept.setdefault(name, []).append(features.tokens[block].float().cpu())
    if not kept:
        raise SoapvitError(f"--images: no image could be read; first problems: {'; '.join(gather_log(log).lines()[:3])}")
    tokens = {name: torch.cat(parts) for name, parts in kept.items()}
    threshold = outlier_threshold(tokens["original"].norm(dim=-1).flatten(), z)
    n, h, w, d = tokens["original"].shape
    half = n // 2
    results = {}
    for name, grid in tokens.items():
        flat = grid.reshape(n, h * w, d)
        results[name] = {**token_artifacts(grid, threshold),
                         "position_probe_acc": position_probe_accuracy(flat[:half], flat[half:]), "chance": 1 / (h * w)}
    settings = {"model": backbone.model_id, "block": block, "grid": [h, w], "n_images": n, "z": z,
                "high_norm_threshold": threshold, "variants": {k: describe_variant(c) for k, c in corrections.items()},
                "position_probe": "ridge 1e-3 on standardised tokens; first half of the images trains, second tests"}
    return ArtifactsReport(results=results, settings=settings, log=gather_log(log),
                           seconds={"total": time.perf_counter() - start}, passes=passes)
