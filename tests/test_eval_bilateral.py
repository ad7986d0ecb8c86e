"""Bilateral solver against a dense solve of Barron & Poole's system built from its definition."""

import numpy as np
import pytest

from soapvit.eval.bilateral import BilateralParams, bilateral_solve


def dense_solution(image, target, p: BilateralParams):
    h, w = target.shape
    rgb = image.reshape(-1, 3).astype(float)
    y = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    u = -0.168736 * rgb[:, 0] - 0.331264 * rgb[:, 1] + 0.5 * rgb[:, 2] + 128
    v = 0.5 * rgb[:, 0] - 0.418688 * rgb[:, 1] - 0.081312 * rgb[:, 2] + 128
    ys, xs = np.divmod(np.arange(h * w), w)
    cells = [
        (int(x / p.sigma_spatial), int(yy / p.sigma_spatial), int(l / p.sigma_luma), int(a / p.sigma_chroma),
         int(b / p.sigma_chroma))
        for x, yy, l, a, b in zip(xs, ys, y, u, v)
    ]
    vertices = sorted(set(cells))
    index = {c: i for i, c in enumerate(vertices)}
    s = np.zeros((len(vertices), h * w))
    for pix, c in enumerate(cells):
        s[index[c], pix] = 1
    blur = np.eye(len(vertices)) * 10  # 2 · 5 dims
    for i, a in enumerate(vertices):
        for j, b in enumerate(vertices):
            diff = np.abs(np.subtract(a, b))
            if diff.sum() == 1:
                blur[i, j] = 1
    m = s.sum(1)
    n = np.ones(len(vertices))
    for _ in range(p.bistochastic_iterations):
        n = np.sqrt(n * m / (blur @ n))
    m = n * (blur @ n)
    c = np.full(h * w, p.confidence)
    a = p.lam * (np.diag(m) - np.diag(n) @ blur @ np.diag(n)) + np.diag(s @ c)
    sol = np.linalg.solve(a, s @ (c * target.reshape(-1)))
    return (s.T @ sol).reshape(h, w)


def two_tone_image(h=14, w=18, seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (200, 40, 40)
    image[:, w // 2 :] = (30, 90, 210)
    return np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)


def test_converged_solver_equals_dense_solve():
    image = two_tone_image()
    rng = np.random.default_rng(1)
    target = (rng.random(image.shape[:2]) < 0.5).astype(float)
    params = BilateralParams(sigma_spatial=4, sigma_luma=16, sigma_chroma=8, cg_iterations=2000, cg_tol=1e-13)
    np.testing.assert_allclose(bilateral_solve(image, target, params), dense_solution(image, target, params), atol=1e-7)


def test_constant_target_is_a_fixed_point():
    image = two_tone_image()
    out = bilateral_solve(image, np.ones(image.shape[:2]))
    np.testing.assert_allclose(out, 1.0, atol=1e-9)


def test_refinement_snaps_to_colour_edges():
    image = two_tone_image(40, 60)
    truth = np.zeros((40, 60))
    truth[:, :30] = 1
    noisy = truth.copy()
    noisy[:, 26:34] = 1 - noisy[:, 26:34]  # a wrong band across the edge
    out = bilateral_solve(image, noisy, BilateralParams(sigma_spatial=8))
    assert np.abs((out > 0.5) - truth).mean() < np.abs(noisy - truth).mean() / 2


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="sizes differ"):
        bilateral_solve(two_tone_image(), np.ones((3, 3)))
