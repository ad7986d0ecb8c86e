"""TokenCut (Wang et al., 2022): a normalised cut on the patch-affinity graph of one image.

For patch features ``f`` (L2-normalised): ``A = 1[cos > τ]`` with zeros replaced by ``eps``,
``D = diag(A·1)``; ``x`` = second-smallest generalised eigenvector of ``(D − A) x = λ D x``;
foreground = ``x > mean(x)`` oriented so that the seed ``argmax |x|`` is foreground; the mask is
the seed's 4-connected component. (TokenCut, Wang et al., CVPR 2022.)

Two solvers give the same masks:

- :func:`tokencut_masks`: batched torch on any device, for images of equal grid size. The
  generalised problem is solved in its symmetric form ``M = D^{-1/2} A D^{-1/2}``: ``x = D^{-1/2} y``
  with ``y`` the top eigenvector of ``M`` orthogonal to the known trivial one ``D^{1/2}·1``.
  ``method="lanczos"`` (default) finds it by Lanczos with full reorthogonalisation and falls
  back to the dense solver for any image that has not converged; ``method="eigh"`` is dense.
- :func:`tokencut_mask_scipy`: the per-image ``scipy.linalg.eigh(D − A, D)`` reference, as in the
  TokenCut code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SoapvitError

METHODS = ("lanczos", "eigh")


@dataclass
class TokenCutOutput:
    """Batched result on the patch grid."""

    masks: Tensor
    """``(B, h, w)`` bool: the seed's connected component."""
    eigenvectors: Tensor
    """``(B, h, w)`` second generalised eigenvector, signed so that the seed is positive side."""
    seeds: Tensor
    """``(B,)`` flat index of the seed patch."""


def affinity(features: Tensor, tau: float, eps: float = 1e-5) -> Tensor:
    """Binary cosine affinity ``(B, N, N)``: 1 where ``cos > τ``, ``eps`` elsewhere."""
    unit = F.normalize(features.float(), dim=-1)
    cos = unit @ unit.transpose(-1, -2)
    return torch.where(cos > tau, 1.0, eps)


def _dense_second_vector(m: Tensor, trivial: Tensor) -> Tensor:
    """Top eigenvector of ``M`` on the complement of ``trivial`` (dense, exact)."""
    deflated = m - 2.0 * trivial[..., :, None] * trivial[..., None, :]  # moves the trivial eigenvalue 1 to −1
    _, vectors = torch.linalg.eigh(deflated)
    return vectors[..., -1]


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """``w − basisᵀ(basis w)`` for ``w (B, N)``, ``basis (B, k, N)``, applied twice for stability."""
    for _ in range(2):
        w = w - torch.einsum("bk,bkn->bn", torch.einsum("bkn,bn->bk", basis, w), basis)
    return w


def _lanczos_second_vector(
    a: Tensor, inv_sqrt_d: Tensor, trivial: Tensor, *, max_steps: int, tol: float, check_every: int = 8,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Top eigenvector of ``M = D^{-1/2} A D^{-1/2}`` orthogonal to ``trivial``, batched.

    Returns ``(vectors (B, N), converged (B,) bool)``; ``converged`` is the Ritz residual
    ``|β_j s_j| < tol``.
    """
    b, n = trivial.shape
    steps = min(max_steps, n - 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.zeros(b, steps + 2, n, dtype=a.dtype, device=a.device)
    basis[:, 0] = trivial  # kept in the basis so every Lanczos vector stays orthogonal to it
    alphas = torch.zeros(b, steps, dtype=a.dtype, device=a.device)
    betas = torch.zeros(b, steps, dtype=a.dtype, device=a.device)

    def random_unit(k: int) -> Tensor:
        w = torch.randn(b, n, generator=gen, dtype=torch.float64).to(a.device, a.dtype)
        w = _orthogonalise(w, basis[:, :k])
        return w / w.norm(dim=-1, keepdim=True)

    basis[:, 1] = random_unit(1)
    best = basis[:, 1]
    converged = torch.zeros(b, dtype=torch.bool, device=a.device)
    for j in range(steps):
        q = basis[:, j + 1]
        w = inv_sqrt_d * torch.einsum("bnm,bm->bn", a, inv_sqrt_d * q)
        alphas[:, j] = (w * q).sum(-1)
        w = _orthogonalise(w, basis[:, : j + 2])
        beta = w.norm(dim=-1)
        betas[:, j] = beta
        broke = beta <= 1e3 * torch.finfo(a.dtype).eps
        if j + 1 < steps:
            nxt = w / beta.clamp_min(torch.finfo(a.dtype).tiny)[:, None]
            if bool(broke.any()):  # invariant subspace found: restart with a fresh orthogonal vector
                nxt = torch.where(broke[:, None], random_unit(j + 2), nxt)
                betas[:, j] = torch.where(broke, torch.zeros_like(beta), beta)
            basis[:, j + 2] = nxt
        if (j + 1) % check_every == 0 or j + 1 == steps:
            k = j + 1
            tri = torch.diag_embed(alphas[:, :k]) + torch.diag_embed(betas[:, : k - 1], 1) + torch.diag_embed(
                betas[:, : k - 1], -1
            )
            _, ritz = torch.linalg.eigh(tri)
            top = ritz[:, :, -1]
            residual = (betas[:, j] * top[:, -1]).abs()
            converged = (residual < tol) | (k == n - 1)
            best = torch.einsum("bk,bkn->bn", top, basis[:, 1 : k + 1])
            if bool(converged.all()):
                break
    return best, converged


def second_eigenvectors(
    features: Tensor, tau: float, eps: float = 1e-5, *, method: str = "lanczos", max_steps: int = 300,
) -> Tensor:
    """Second-smallest generalised eigenvectors ``(B, N)`` of ``(D − A) x = λ D x`` for patch
    features ``(B, N, D)``, normalised so that ``xᵀ D x = 1`` (as ``scipy.linalg.eigh``)."""
    if method not in METHODS:
        raise SoapvitError(f"--solver must be one of {', '.join(METHODS)}, not {method!r}")
    dtype = torch.float64 if features.device.type == "cpu" else torch.float32
    a = affinity(features, tau, eps).to(dtype)
    degree = a.sum(-1)
    inv_sqrt_d = degree.rsqrt()
    trivial = F.normalize(degree.sqrt(), dim=-1)
    if method == "eigh" or a.shape[-1] <= 3:
        y = _dense_second_vector(inv_sqrt_d[:, :, None] * a * inv_sqrt_d[:, None, :], trivial)
    else:
        tol = 1e-7 if dtype == torch.float64 else 1e-4
        y, converged = _lanczos_second_vector(a, inv_sqrt_d, trivial, max_steps=max_steps, tol=tol)
        if not bool(converged.all()):
            idx = (~converged).nonzero().flatten()
            m = inv_sqrt_d[idx, :, None] * a[idx] * inv_sqrt_d[idx, None, :]
            y[idx] = _dense_second_vector(m, trivial[idx])
    return (inv_sqrt_d * y).float()


def seed_component(foreground: Tensor, seeds: Tensor) -> Tensor:
    """The 4-connected component of ``foreground (B, h, w)`` holding the flat index ``seeds (B,)``,
    by flood fill (batched, any device)."""
    b, h, w = foreground.shape
    reached = torch.zeros(b, h * w, dtype=torch.bool, device=foreground.device)
    reached[torch.arange(b, device=foreground.device), seeds] = True
    reached = reached.view(b, h, w) & foreground
    while True:
        grown = reached.clone()
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown[:, :, 1:] |= reached[:, :, :-1]
        grown[:, :, :-1] |= reached[:, :, 1:]
        grown &= foreground
        if torch.equal(grown, reached):
            return reached
        reached = grown


def bipartition(vectors: Tensor, grid: tuple[int, int]) -> TokenCutOutput:
    """Mean split, seed ``argmax |x|``, flip so the seed is foreground, seed's component."""
    b = vectors.shape[0]
    foreground = vectors > vectors.mean(-1, keepdim=True)
    seeds = vectors.abs().argmax(-1)
    seed_fg = foreground[torch.arange(b, device=vectors.device), seeds]
    foreground = torch.where(seed_fg[:, None], foreground, ~foreground)
    signed = torch.where(seed_fg[:, None], vectors, -vectors)
    masks = seed_component(foreground.view(b, *grid), seeds)
    return TokenCutOutput(masks=masks, eigenvectors=signed.view(b, *grid), seeds=seeds)


def tokencut_masks(features: Tensor, tau: float, eps: float = 1e-5, *, method: str = "lanczos") -> TokenCutOutput:
    """TokenCut on a batch of patch grids ``(B, h, w, D)`` (equal grid size), on their device."""
    b, h, w, d = features.shape
    vectors = second_eigenvectors(features.reshape(b, h * w, d), tau, eps, method=method)
    return bipartition(vectors, (h, w))


def tokencut_mask_scipy(features: np.ndarray | Tensor, tau: float, eps: float = 1e-5) -> np.ndarray:
    """Per-image reference on the same affinities (:func:`affinity`): ``scipy.linalg.eigh(D − A, D)``
    and ``scipy.ndimage.label``, as the TokenCut code. ``features (h, w, D)`` → bool mask ``(h, w)``."""
    from scipy import ndimage
    from scipy.linalg import eigh

    h, w, d = features.shape
    a = affinity(torch.as_tensor(features).reshape(1, h * w, d), tau, eps)[0].double().numpy()
    degree = np.diag(a.sum(axis=1))
    _, vectors = eigh(degree - a, degree, subset_by_index=[1, 2])
    x = vectors[:, 0]
    foreground = x > x.mean()
    seed = int(np.argmax(np.abs(x)))
    if not foreground[seed]:
        foreground = ~foreground
    labels, _ = ndimage.label(foreground.reshape(h, w))
    return labels == labels.flat[seed]


def upsample_nearest(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest upsampling of ``(B, h, w)`` maps to ``size = (H, W)`` (index ``⌊i·h/H⌋``, as
    ``F.interpolate(mode="nearest")`` in TokenCut)."""
    out = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0]
    return out.to(masks.dtype)
