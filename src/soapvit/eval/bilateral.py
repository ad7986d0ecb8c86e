"""The fast bilateral solver (Barron & Poole, ECCV 2016), as TokenCut uses it to refine masks.

Pixels are splatted onto a bilateral grid whose vertices are the occupied cells of
``(x/σ_spatial, y/σ_spatial, Y/σ_luma, U/σ_chroma, V/σ_chroma)`` (YUV of the reference image).
In grid space the solver minimises ``λ/2 Σ Ŵ_ij (y_i − y_j)² + Σ c_i (y_i − t_i)²`` with the
bistochastised blur ``Ŵ``, i.e. solves ``A y = b`` with

    A = λ (D_m − D_n B D_n) + diag(S c),    b = S (c ⊙ t),

by Jacobi-preconditioned conjugate gradients started at ``S(c⊙t) / S c``, and slices back
``x = Sᵀ y``. ``B`` is the sum over the five grid dimensions of ``[1 2 1]`` blurs (as in the
authors' reference code, which TokenCut's parameters were tuned with). Pure numpy: no
``scipy.sparse.linalg.cg`` (whose ``tol``/``rtol`` arguments changed across SciPy versions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
YUV_OFFSET = np.array([0.0, 128.0, 128.0])


@dataclass(frozen=True)
class BilateralParams:
    """TokenCut's settings (its ``get_saliency.py``)."""

    sigma_spatial: float = 16.0
    sigma_luma: float = 16.0
    sigma_chroma: float = 8.0
    lam: float = 256.0
    confidence: float = 0.999
    cg_iterations: int = 25
    cg_tol: float = 1e-5
    diag_min: float = 1e-5
    bistochastic_iterations: int = 10


class BilateralGrid:
    """Splat/slice/blur operators of one reference image ``(H, W, 3)`` uint8 RGB."""

    def __init__(self, image: np.ndarray, params: BilateralParams) -> None:
        height, width = image.shape[:2]
        yuv = image.astype(np.float64) @ RGB_TO_YUV.T + YUV_OFFSET
        ys, xs = np.mgrid[:height, :width]
        coords = np.stack(
            [
                (xs / params.sigma_spatial).astype(np.int64),
                (ys / params.sigma_spatial).astype(np.int64),
                (yuv[..., 0] / params.sigma_luma).astype(np.int64),
                (yuv[..., 1] / params.sigma_chroma).astype(np.int64),
                (yuv[..., 2] / params.sigma_chroma).astype(np.int64),
            ],
            axis=-1,
        ).reshape(-1, 5)
        coords = coords - coords.min(axis=0) + 1  # room for the −1 neighbour
        radix = coords.max(axis=0) + 2  # room for the +1 neighbour, so no carries between dims
        strides = np.cumprod(np.concatenate([[1], radix[:-1]])).astype(np.int64)
        keys = coords @ strides
        vertex_keys, self.pixel_vertex = np.unique(keys, return_inverse=True)
        self.pixel_vertex = self.pixel_vertex.reshape(-1)
        self.num_vertices = len(vertex_keys)
        self.num_pixels = len(keys)
        self.dims = coords.shape[1]
        self.neighbours: list[tuple[np.ndarray, np.ndarray]] = []
        for stride in strides:
            for step in (-stride, stride):
                target = vertex_keys + step
                pos = np.clip(np.searchsorted(vertex_keys, target), 0, self.num_vertices - 1)
                present = np.flatnonzero(vertex_keys[pos] == target)
                self.neighbours.append((present, pos[present]))

    def splat(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.pixel_vertex, weights=values, minlength=self.num_vertices)

    def slice(self, values: np.ndarray) -> np.ndarray:
        return values[self.pixel_vertex]

    def blur(self, values: np.ndarray) -> np.ndarray:
        out = 2.0 * self.dims * values
        for vertex, neighbour in self.neighbours:
            out[vertex] += values[neighbour]
        return out


def bistochastize(grid: BilateralGrid, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Diagonals ``(m, n)`` with ``n ⊙ B n = m`` (Sinkhorn-like iterations of the paper)."""
    m = grid.splat(np.ones(grid.num_pixels))
    n = np.ones(grid.num_vertices)
    for _ in range(iterations):
        n = np.sqrt(n * m / grid.blur(n))
    return n * grid.blur(n), n


def conjugate_gradient(apply_a, b: np.ndarray, x0: np.ndarray, inv_diag: np.ndarray, iterations: int,
                       tol: float) -> np.ndarray:
    """Jacobi-preconditioned CG; stops after ``iterations`` or when ``‖r‖ ≤ tol·‖b‖``."""
    x = x0.copy()
    r = b - apply_a(x)
    z = inv_diag * r
    p = z.copy()
    rz = r @ z
    stop = tol * np.linalg.norm(b)
    for _ in range(iterations):
        if np.linalg.norm(r) <= stop:
            break
        ap = apply_a(p)
        alpha = rz / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        z = inv_diag * r
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def bilateral_solve(image: np.ndarray, target: np.ndarray, params: BilateralParams = BilateralParams(),
                    confidence: np.ndarray | None = None) -> np.ndarray:
    """Refine ``target (H, W)`` (e.g. a 0/1 mask) edge-aware w.r.t. ``image (H, W, 3)`` uint8.

    Returns the soft solution ``(H, W)`` float64 (TokenCut scores this map directly)."""
    if image.shape[:2] != target.shape:
        raise ValueError(f"image {image.shape[:2]} and target {target.shape} sizes differ")
    grid = BilateralGrid(image, params)
    m, n = bistochastize(grid, params.bistochastic_iterations)
    c = (np.full(target.size, params.confidence) if confidence is None else confidence.reshape(-1).astype(np.float64))
    t = target.reshape(-1).astype(np.float64)
    c_splat = grid.splat(c)
    b = grid.splat(c * t)
    # diagonal of A: the blur's centre weight is 2·dims
    diag = params.lam * (m - n * n * 2.0 * grid.dims) + c_splat

    def apply_a(y: np.ndarray) -> np.ndarray:
        return params.lam * (m * y - n * grid.blur(n * y)) + c_splat * y

    y0 = b / np.maximum(c_splat, np.finfo(np.float64).tiny)
    y = conjugate_gradient(apply_a, b, y0, 1.0 / np.maximum(diag, params.diag_min), params.cg_iterations, params.cg_tol)
    return grid.slice(y).reshape(target.shape)
