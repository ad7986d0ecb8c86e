"""TokenCut: batched torch solvers against the per-image scipy reference, flood fill against
scipy.ndimage.label, upsampling against the index formula."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.linalg import eigh

from soapvit.eval.tokencut import (
    affinity,
    second_eigenvectors,
    seed_component,
    tokencut_mask_scipy,
    tokencut_masks,
    upsample_nearest,
)


def blob_features(seed: int, b: int, h: int, w: int, d: int = 32, noise: float = 1.0) -> torch.Tensor:
    """Patch features with one elliptic object on a background, plus noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = []
    for _ in range(b):
        cy, cx = torch.rand(2, generator=g) * torch.tensor([h, w])
        ry, rx = 1 + torch.rand(2, generator=g) * torch.tensor([h / 3, w / 3])
        obj = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1).float()[..., None]
        base = torch.randn(2, d, generator=g)
        out.append(obj * base[0] + (1 - obj) * base[1] + noise * torch.randn(h, w, d, generator=g))
    return torch.stack(out)


def np_affinity(features: np.ndarray, tau: float, eps: float = 1e-5) -> np.ndarray:
    """TokenCut's affinity written independently in float64 numpy: ``1[cos > τ]``, zeros → eps."""
    f = np.asarray(features, dtype=np.float64).reshape(-1, np.shape(features)[-1])
    unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return np.where(unit @ unit.T > tau, 1.0, eps)


def np_tokencut(features: np.ndarray, tau: float, eps: float = 1e-5) -> np.ndarray:
    """The TokenCut code's per-image cut, independent of soapvit: ``scipy.linalg.eigh(D − A, D)``,
    mean split, seed argmax |x| on the foreground side, the seed's ``ndimage.label`` component."""
    h, w, _ = features.shape
    a = np_affinity(features, tau, eps)
    d = np.diag(a.sum(axis=1))
    _, vectors = eigh(d - a, d, subset_by_index=[1, 2])
    x = vectors[:, 0]
    foreground = x > x.mean()
    seed = int(np.argmax(np.abs(x)))
    if not foreground[seed]:
        foreground = ~foreground
    labels, _ = ndimage.label(foreground.reshape(h, w))
    return labels == labels.flat[seed]


def test_affinity_is_thresholded_cosine():
    f = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    a = affinity(f, tau=0.5, eps=1e-5)[0]
    cos = np.array([[1, 2**-0.5, 0], [2**-0.5, 1, 2**-0.5], [0, 2**-0.5, 1]])
    np.testing.assert_allclose(a.numpy(), np.where(cos > 0.5, 1.0, 1e-5))
    np.testing.assert_allclose(np_affinity(f[0].numpy(), 0.5), np.where(cos > 0.5, 1.0, 1e-5))
    feats = blob_features(3, 1, 6, 7, noise=1.0)[0]
    np.testing.assert_allclose(affinity(feats.reshape(1, 42, -1), 0.2)[0].double().numpy(), np_affinity(feats.numpy(), 0.2))


@pytest.mark.parametrize("method", ["lanczos", "eigh"])
def test_eigenvector_matches_scipy_generalised_eigh(method):
    feats = blob_features(1, 3, 9, 11, noise=0.8)
    vectors = second_eigenvectors(feats.reshape(3, 99, -1), tau=0.2, method=method).double().numpy()
    for i in range(3):
        a = np_affinity(feats[i].numpy(), 0.2)
        d = np.diag(a.sum(1))
        _, ref = eigh(d - a, d, subset_by_index=[1, 2])
        x = ref[:, 0]
        sign = np.sign(x @ vectors[i])
        np.testing.assert_allclose(sign * vectors[i], x, atol=2e-5)
        assert abs(vectors[i] @ d @ vectors[i] - 1) < 1e-4  # scipy's normalisation xᵀDx = 1


def well_posed(features: np.ndarray, tau: float) -> bool:
    """True when TokenCut's answer is unique: a simple second eigenvalue of (D − A) x = λ D x,
    no tie for the seed argmax |x| and no entry at the mean. Tiny symmetric grids violate this,
    and then every solver legitimately picks its own answer."""
    f = features.reshape(-1, features.shape[-1])
    a = np_affinity(f, tau)
    d = np.diag(a.sum(1))
    values, vectors = eigh(d - a, d, subset_by_index=[1, 2])
    x = vectors[:, 0]
    top = np.sort(np.abs(x))[-2:]
    scale = np.abs(x).max()
    return bool(values[1] - values[0] > 1e-3 * max(values[1], 1e-12) and top[1] - top[0] > 1e-6 * scale
                and np.abs(x - x.mean()).min() > 1e-9 * scale)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(2, 14), w=st.integers(2, 14), noise=st.floats(0.3, 2.0))
def test_batched_masks_equal_scipy_reference(seed, h, w, noise):
    feats = blob_features(seed, 4, h, w, noise=noise)
    for method in ("lanczos", "eigh"):
        masks = tokencut_masks(feats, tau=0.2, method=method).masks.numpy()
        for i, f in enumerate(feats):
            if well_posed(f.numpy(), 0.2):
                np.testing.assert_array_equal(masks[i], np_tokencut(f.numpy(), 0.2), err_msg=method)
                np.testing.assert_array_equal(tokencut_mask_scipy(f.numpy(), 0.2), np_tokencut(f.numpy(), 0.2))


def test_batched_masks_equal_scipy_on_realistic_grid():
    feats = blob_features(7, 3, 21, 29, d=64, noise=1.5)
    out = tokencut_masks(feats, tau=0.2)
    for i, f in enumerate(feats):
        ref = np_tokencut(f.numpy(), 0.2)
        np.testing.assert_array_equal(tokencut_mask_scipy(f.numpy(), 0.2), ref)
        np.testing.assert_array_equal(out.masks[i].numpy(), ref)
        seed = np.unravel_index(int(out.seeds[i]), ref.shape)
        assert ref[seed] and out.eigenvectors[i][seed] > 0


def test_two_regions_give_the_seed_region():
    # left 3 columns one feature, right 4 columns another: the cut separates them exactly
    f = torch.zeros(1, 5, 7, 2)
    f[0, :, :3, 0] = 1.0
    f[0, :, 3:, 1] = 1.0
    f[0, 2, 5] = torch.tensor([0.3, 1.0])  # a slightly odd patch on the right
    out = tokencut_masks(f, tau=0.5)
    mask = out.masks[0].numpy()
    assert mask.sum() in (15, 20)
    assert (mask[:, :3].all() and not mask[:, 3:].any()) or (mask[:, 3:].all() and not mask[:, :3].any())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 12), w=st.integers(1, 12), p=st.floats(0.2, 0.8))
def test_flood_fill_equals_scipy_label(seed, h, w, p):
    rng = np.random.default_rng(seed)
    fg = rng.random((3, h, w)) < p
    seeds = rng.integers(0, h * w, 3)
    fg.reshape(3, -1)[np.arange(3), seeds] = True
    got = seed_component(torch.from_numpy(fg), torch.from_numpy(seeds)).numpy()
    for i in range(3):
        labels, _ = ndimage.label(fg[i])  # default structure: 4-connectivity
        np.testing.assert_array_equal(got[i], labels == labels.flat[seeds[i]])


def test_upsample_nearest_uses_floor_index():
    m = torch.arange(12).reshape(1, 3, 4).float()
    out = upsample_nearest(m, (7, 10))[0].numpy()
    rows = np.floor(np.arange(7) * 3 / 7).astype(int)
    cols = np.floor(np.arange(10) * 4 / 10).astype(int)
    np.testing.assert_array_equal(out, m[0].numpy()[rows][:, cols])
