"""Streaming statistics of patch tokens: mergeable moments and sign-response counts.

:class:`StreamingMoments` keeps count, mean and the centred scatter matrix in float64 and
merges batches with Chan et al.'s parallel update, so chunks of any size, from any number of
processes, give the same mean and covariance as one pass. :class:`ResponseCounts` counts, per
patch position and principal component, how often a token projects positively.
:class:`NormHistogram` bins token norms on a log scale (quantiles for outlier thresholds). All
merge across the processes of a :mod:`torch.distributed` group (``across_ranks``) and round-trip
through ``state_dict`` (fit checkpoints). :class:`FitStatistics` is what one fit hands to the
corrections.

On a GPU every update stays on the device: the batch's scatter in the tokens' float32, the merge
into the float64 accumulators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import distributed


class StreamingMoments:
    """Mean and covariance of ``D``-dimensional rows, updated batch by batch (float64)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, rows: Tensor) -> StreamingMoments:
        """Add ``rows`` ``(N, D)``: batch moments first, then a Chan merge in float64.

        The batch's centred scatter is computed in the rows' own floating dtype (float32 model
        tokens stay float32, which halves the cost on CPU); float64 rows stay exact.
        """
        rows = rows.reshape(-1, self.dim).to(self.mean.device)
        if not rows.is_floating_point() or rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()
        n = rows.shape[0]
        if n == 0:
            return self
        batch_mean = rows.mean(dim=0, dtype=torch.float64)
        centred = rows - batch_mean.to(rows.dtype)
        self._merge(n, batch_mean, (centred.T @ centred).double())
        return self

    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Fold another accumulator (e.g. from another process) into this one."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        if other.count:
            self._merge(other.count, other.mean.to(self.mean.device), other.scatter.to(self.mean.device))
        return self

    def across_ranks(self) -> StreamingMoments:
        """The moments of every process's rows: per-rank (count, mean, scatter) gathered and
        Chan-merged in rank order, identical on every rank."""
        if not distributed.active():
            return self
        counts = distributed.all_gather_tensor(torch.tensor([self.count], dtype=torch.int64, device=self.mean.device))
        means = distributed.all_gather_tensor(self.mean)
        scatters = distributed.all_gather_tensor(self.scatter)
        merged = StreamingMoments(self.dim, self.mean.device)
        for count, mean, scatter in zip(counts, means, scatters):
            if int(count):
                merged._merge(int(count), mean, scatter)
        return merged

    def _merge(self, n_b: int, mean_b: Tensor, scatter_b: Tensor) -> None:
        n_a = self.count
        total = n_a + n_b
        delta = mean_b - self.mean
        self.scatter += scatter_b + torch.outer(delta, delta) * (n_a * n_b / total)
        self.mean += delta * (n_b / total)
        self.count = total

    def covariance(self, correction: int = 1) -> Tensor:
        """Covariance with ``correction`` (1: unbiased, as the SOAP reference)."""
        if self.count <= correction:
            raise ValueError(f"need more than {correction} rows for a covariance, have {self.count}")
        return self.scatter / (self.count - correction)

    def state_dict(self) -> dict[str, Tensor]:
        return {"count": torch.tensor(self.count, dtype=torch.int64), "mean": self.mean, "scatter": self.scatter}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], device: torch.device | str = "cpu") -> StreamingMoments:
        moments = cls(state["mean"].numel(), device)
        moments.count = int(state["count"])
        moments.mean = state["mean"].to(device, torch.float64).clone()
        moments.scatter = state["scatter"].to(device, torch.float64).clone()
        return moments


def principal_components(moments: StreamingMoments) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns, same order) of the covariance."""
    eigenvalues, eigenvectors = torch.linalg.eigh(moments.covariance())
    return eigenvalues.flip(0), eigenvectors.flip(1)


def positional_fraction(position_mean: Tensor, mean: Tensor, eigenvectors: Tensor, eigenvalues: Tensor) -> Tensor:
    """Share of each component's variance explained by patch position alone, in [0, 1].

    ``position_mean`` ``(h, w, D)`` is the mean token at each position; the between-position
    variance of ``(μ_pos − μ)·v_d`` divided by ``λ_d``. Near 1: the component is a position code.
    """
    offsets = (position_mean.reshape(-1, position_mean.shape[-1]).double() - mean.double()) @ eigenvectors.double()
    between = offsets.pow(2).mean(dim=0)
    return (between / eigenvalues.double().clamp_min(1e-12)).clamp(0.0, 1.0)


@dataclass
class ResponseCounts:
    """Per position ``(h, w)`` and component ``d``: how many images had a positive response.

    Two response rules are counted together so either SOAP variant can be scored later:
    ``centred`` is ``(z − μ)·v > 0`` (reference code), ``raw`` is ``z·v ≥ 0`` (project page).
    """

    centred: Tensor  # (h, w, D) int64
    raw: Tensor  # (h, w, D) int64
    images: int = 0

    @classmethod
    def zeros(cls, grid: tuple[int, int], dim: int, device: torch.device | str = "cpu") -> ResponseCounts:
        shape = (*grid, dim)
        return cls(torch.zeros(shape, dtype=torch.int64, device=device),
                   torch.zeros(shape, dtype=torch.int64, device=device))

    def update(self, tokens: Tensor, mean: Tensor, components: Tensor) -> ResponseCounts:
        """Add tokens ``(B, h, w, D)`` given the PCA ``mean`` ``(D,)`` and ``components`` ``(D, D)``."""
        if tokens.shape[1:3] != self.centred.shape[:2]:
            raise ValueError(
                f"response maps need one grid size: got {tuple(tokens.shape[1:3])}, "
                f"expected {tuple(self.centred.shape[:2])} (use a fixed --image-size)"
            )
        z = tokens.to(components.dtype)
        raw = z @ components
        offset = mean.to(components.dtype) @ components
        self.centred += (raw > offset).sum(dim=0).to(self.centred.device)
        self.raw += (raw >= 0).sum(dim=0).to(self.raw.device)
        self.images += tokens.shape[0]
        return self

    def across_ranks(self) -> ResponseCounts:
        """The counts of every process summed (integers: exact), identical on every rank."""
        images = distributed.all_reduce_sum(torch.tensor([self.images], dtype=torch.int64, device=self.raw.device))
        return ResponseCounts(distributed.all_reduce_sum(self.centred), distributed.all_reduce_sum(self.raw),
                              int(images))

    def state_dict(self) -> dict[str, Tensor]:
        return {"centred": self.centred, "raw": self.raw, "images": torch.tensor(self.images, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], device: torch.device | str = "cpu") -> ResponseCounts:
        return cls(state["centred"].to(device, torch.int64).clone(), state["raw"].to(device, torch.int64).clone(),
                   int(state["images"]))

    def merge(self, other: ResponseCounts) -> ResponseCounts:
        self.centred += other.centred.to(self.centred.device)
        self.raw += other.raw.to(self.raw.device)
        self.images += other.images
        return self

    def probabilities(self, rule: str = "centred") -> Tensor:
        """Per-position response probability ``(h, w, D)`` in float64."""
        counts = {"centred": self.centred, "raw": self.raw}[rule]
        return counts.double() / max(self.images, 1)


class NormHistogram:
    """Counts of token L2 norms in ``bins`` log-spaced bins over ``[low, high]`` (values outside
    land in the end bins); relative resolution ``(high/low)^(1/bins)``, 0.3 % by default."""

    def __init__(self, low: float = 1e-4, high: float = 1e6, bins: int = 8192, device: torch.device | str = "cpu",
                 counts: Tensor | None = None) -> None:
        self.low, self.high, self.bins = float(low), float(high), int(bins)
        self.counts = counts if counts is not None else torch.zeros(bins, dtype=torch.int64, device=device)

    def _index(self, values: Tensor) -> Tensor:
        scale = self.bins / math.log(self.high / self.low)
        index = torch.floor((values.double().clamp_min(self.low).log() - math.log(self.low)) * scale)
        return index.clamp(0, self.bins - 1).long()

    def update(self, tokens: Tensor) -> NormHistogram:
        """Add the norms of tokens ``(..., D)``."""
        norms = tokens.float().norm(dim=-1).reshape(-1).to(self.counts.device)
        self.counts += torch.bincount(self._index(norms), minlength=self.bins)
        return self

    def edges(self) -> Tensor:
        """``bins + 1`` bin edges (float64)."""
        return torch.logspace(math.log10(self.low), math.log10(self.high), self.bins + 1, dtype=torch.float64)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (the geometric centre of the bin holding it)."""
        total = int(self.counts.sum())
        if total == 0:
            raise ValueError("no norms were counted")
        cumulative = self.counts.cpu().cumsum(0)
        rank = max(1, math.ceil(q * total))  # the rank-th smallest norm
        index = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype)).clamp(max=self.bins - 1))
        edges = self.edges()
        return float((edges[index] * edges[index + 1]).sqrt())

    def share_above(self, threshold: float) -> float:
        """Share of the counted norms in bins above ``threshold``'s bin."""
        total = int(self.counts.sum())
        index = int(self._index(torch.tensor([threshold]))[0])
        return float(self.counts[index + 1 :].sum()) / max(total, 1)

    def across_ranks(self) -> NormHistogram:
        return NormHistogram(self.low, self.high, self.bins, counts=distributed.all_reduce_sum(self.counts))

    def state_dict(self) -> dict[str, Tensor]:
        return {"counts": self.counts, "range": torch.tensor([self.low, self.high], dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], device: torch.device | str = "cpu") -> NormHistogram:
        low, high = state["range"].tolist()
        counts = state["counts"].to(device, torch.int64).clone()
        return cls(low, high, counts.numel(), counts=counts)


@dataclass
class BlockStatistics:
    """Everything one pass over the data gives for one block."""

    moments: StreamingMoments
    eigenvalues: Tensor
    eigenvectors: Tensor
    real: ResponseCounts
    synthetic: ResponseCounts
    position_mean: Tensor  # (h, w, D) mean real token per patch position
    norms: NormHistogram | None = None  # patch-token norms of the real images

    @property
    def position_share(self) -> Tensor:
        """``(D,)`` share of each component's variance explained by patch position."""
        return positional_fraction(self.position_mean, self.moments.mean, self.eigenvectors, self.eigenvalues)


@dataclass
class FitStatistics:
    """What one fit gives every correction: per-block statistics of the real (and synthetic)
    tokens, and the tokens of the image that is zero after normalisation, at the fit's grid."""

    blocks: dict[int, BlockStatistics]
    grid: tuple[int, int]
    zero_image: dict[int, Tensor] = field(default_factory=dict)  # block → (h, w, D)
