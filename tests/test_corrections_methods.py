"""The published alternatives to SOAP (METHODS.md §7), each against an independent numpy
recomputation or a hand-computed case, and their round trip through the corrections file."""

import numpy as np
import pytest
import torch
from conftest import ToyBackbone
from hypothesis import given, settings
from hypothesis import strategies as st

from soapvit.corrections import METHODS, CorrectionSet, attach
from soapvit.corrections.blank import BlankTemplate
from soapvit.corrections.high_norm import HighNormRepair, robust_threshold
from soapvit.corrections.position_pc import PositionComponents
from soapvit.corrections.top_pc import TopComponents
from soapvit.corrections.zero_subspace import ZeroSubspace
from soapvit.errors import SoapvitError
from soapvit.features import encode
from soapvit.stats import (BlockStatistics, FitStatistics, NormHistogram, ResponseCounts, StreamingMoments,
                           principal_components)

BLOCK = 0


def fit_statistics(tokens: np.ndarray, zero: np.ndarray | None = None) -> FitStatistics:
    """The statistics a fit gathers, from real tokens ``(n, h, w, D)`` (and zero-image tokens)."""
    t = torch.from_numpy(tokens)
    n, h, w, d = t.shape
    moments = StreamingMoments(d).update(t.reshape(-1, d))
    values, vectors = principal_components(moments)
    counts = ResponseCounts.zeros((h, w), d)
    block = BlockStatistics(moments, values, vectors, counts, counts, t.double().mean(0), NormHistogram().update(t))
    zeros = {} if zero is None else {BLOCK: torch.from_numpy(zero)}
    return FitStatistics({BLOCK: block}, (h, w), zeros)


def positional_tokens(rng: np.random.Generator, n=40, grid=(3, 4), d=6) -> np.ndarray:
    """Noise with most variance on axis 0 (not positional) and a position code on axis 3."""
    scale = np.array([5.0, 2.0, 1.5, 0.5, 1.0, 0.8][:d])
    tokens = rng.normal(size=(n, *grid, d)) * scale
    tokens[..., 3] += 3.0 * rng.normal(size=grid)
    return tokens + rng.normal(size=d)


def close(actual: torch.Tensor, expected: np.ndarray, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(actual.double().numpy(), expected, atol=tol, rtol=tol)


# -- top-pc ------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 5))
def test_top_pc_matches_numpy_all_but_the_top(seed, k):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(30, 2, 3, 5)) * np.array([4.0, 3.0, 2.0, 1.0, 0.5]) + rng.normal(size=5) * 3
    correction = TopComponents(k=k).fit(fit_statistics(real), BLOCK)
    x = real.reshape(-1, 5)
    mean = x.mean(0)
    _, vectors = np.linalg.eigh(np.cov(x.T))
    top = vectors[:, ::-1][:, :k]
    z = rng.normal(size=(2, 2, 3, 5)) * 3
    expected = (z - mean) - ((z - mean) @ top) @ top.T
    close(correction.transform(torch.from_numpy(z).float()), expected, 1e-4)
    assert correction.components_.shape == (5, k) and (correction.block_, correction.dim_) == (BLOCK, 5)


def test_top_pc_output_is_centred_and_clips_k():
    real = np.random.default_rng(1).normal(size=(20, 2, 2, 4)) + 7.0
    correction = TopComponents(k=9).fit(fit_statistics(real), BLOCK)
    out = correction.transform(torch.from_numpy(real).float())
    assert correction.components_.shape == (4, 4)
    assert out.abs().max() < 1e-4  # every component removed: nothing is left, not even the mean


# -- position-pc -------------------------------------------------------------------------------
@pytest.mark.parametrize("mu", [1, 2, 3])
def test_position_pc_ranks_by_the_numpy_position_share(mu):
    rng = np.random.default_rng(mu)
    real = positional_tokens(rng)
    correction = PositionComponents(mu=mu).fit(fit_statistics(real), BLOCK)
    x = real.reshape(-1, real.shape[-1])
    values, vectors = np.linalg.eigh(np.cov(x.T))
    position_mean = real.mean(0).reshape(-1, x.shape[1])
    between = (((position_mean - x.mean(0)) @ vectors) ** 2).mean(0)
    shares = between / values
    order = np.argsort(-shares, kind="stable")[:mu]
    chosen = vectors[:, order]
    np.testing.assert_allclose(correction.shares_.numpy(), shares[order], rtol=1e-5)
    assert abs(correction.components_[3, 0]) > 0.99  # the position code, not the top-variance axis 0
    z = rng.normal(size=(2, 3, 4, x.shape[1]))
    close(correction.transform(torch.from_numpy(z).float()), z - (z @ chosen) @ chosen.T, 1e-4)


def test_position_pc_never_ranks_a_component_without_variance():
    """Hand-built: axis 1 has share 1/2 (offsets ±1, variance 2); axis 3 has rounding-level variance
    and offsets, share 1: it carries nothing and must not be removed (SOAP's degenerate rule)."""
    moments = StreamingMoments(4)
    offsets = torch.tensor([[[0.0, 1.0, 0.0, 1e-5], [0.0, -1.0, 0.0, -1e-5]]], dtype=torch.float64)
    counts = ResponseCounts.zeros((1, 2), 4)
    block = BlockStatistics(moments, torch.tensor([4.0, 2.0, 1.0, 1e-10], dtype=torch.float64),
                            torch.eye(4, dtype=torch.float64), counts, counts, offsets)
    correction = PositionComponents(mu=1).fit(FitStatistics({BLOCK: block}, (1, 2)), BLOCK)
    torch.testing.assert_close(correction.components_[:, 0], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(correction.shares_, torch.tensor([0.5]))


# -- zero-subspace -----------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 6), renormalise=st.booleans())
def test_zero_subspace_matches_numpy_svd(seed, k, renormalise):
    rng = np.random.default_rng(seed)
    zero = rng.normal(size=(3, 4, 8)) + 2.0  # a common offset: centring matters
    correction = ZeroSubspace(k=k, renormalise=renormalise).fit(fit_statistics(rng.normal(size=(3, 3, 4, 8)), zero),
                                                                BLOCK)
    e = zero.reshape(-1, 8)
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).T
    u = np.linalg.svd(e - e.mean(axis=1, keepdims=True))[0][:, :k]
    z = rng.normal(size=(2, 5, 2, 8)) * 4
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    expected = z - (z @ u) @ u.T
    if renormalise:
        expected = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
    close(correction.transform(torch.from_numpy(z * 4).float()), expected, 1e-4)
    assert correction.k_ == k


def test_zero_subspace_clips_k_to_the_rank():
    zero = np.random.default_rng(0).normal(size=(2, 3, 10))  # 6 tokens, centred: rank 5
    correction = ZeroSubspace(k=50).fit(fit_statistics(np.zeros((2, 2, 3, 10)), zero), BLOCK)
    assert correction.k_ == 5 and correction.basis_.shape == (10, 5)


# -- high-norm ---------------------------------------------------------------------------------
def test_high_norm_hand_computed_grid():
    first = [[100, 2, 3, 4], [5, 100, 7, 8], [9, 10, 11, 12]]
    # a 3x3 block of outliers: the inner one has no normal neighbour, the image mean is (4 + 8 + 12) / 3
    second = [[100, 100, 100, 4], [100, 100, 100, 8], [100, 100, 100, 12]]
    third = [[100] * 4] * 3  # no normal token: left as it is
    tokens = torch.tensor([first, second, third], dtype=torch.float32)[..., None]
    tokens = torch.cat([tokens, -tokens], dim=-1)  # D = 2, norm √2·value
    correction = HighNormRepair(threshold=50.0).fit(fit_statistics(np.ones((2, 3, 4, 2))), BLOCK)
    out = correction.transform(tokens)[..., 0]
    expected = torch.tensor([
        [[(2 + 5) / 2, 2, 3, 4], [5, (2 + 3 + 5 + 7 + 9 + 10 + 11) / 7, 7, 8], [9, 10, 11, 12]],
        [[8, 8, (4 + 8) / 2, 4], [8, 8, (4 + 8 + 12) / 3, 8], [8, 8, (8 + 12) / 2, 12]],
        third,
    ])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(correction.transform(tokens)[..., 1], -expected)


def loop_repair(tokens: np.ndarray, threshold: float) -> np.ndarray:
    """The rule written token by token (the reference for the vectorised one)."""
    out = tokens.copy()
    b, h, w, _ = tokens.shape
    normal = np.linalg.norm(tokens, axis=-1) <= threshold
    for i in range(b):
        if not normal[i].any():
            continue
        for y in range(h):
            for x in range(w):
                if normal[i, y, x]:
                    continue
                near = [tokens[i, yy, xx] for yy in range(max(y - 1, 0), min(y + 2, h))
                        for xx in range(max(x - 1, 0), min(x + 2, w)) if (yy, xx) != (y, x) and normal[i, yy, xx]]
                out[i, y, x] = np.mean(near, axis=0) if near else tokens[i][normal[i]].mean(axis=0)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), b=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
       share=st.floats(0.0, 1.0))
def test_high_norm_matches_the_token_by_token_rule(seed, b, h, w, share):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(b, h, w, 3))
    outliers = rng.random((b, h, w)) < share
    tokens[outliers] *= 100
    correction = HighNormRepair(threshold=20.0).fit(fit_statistics(np.ones((2, 1, 1, 3))), BLOCK)
    close(correction.transform(torch.from_numpy(tokens)), loop_repair(tokens, 20.0), 1e-9)


def test_high_norm_threshold_from_the_histogram_is_median_plus_z_mad():
    norms = np.abs(np.random.default_rng(0).normal(10.0, 2.0, size=2001))
    tokens = np.zeros((1, 1, norms.size, 2))
    tokens[0, 0, :, 0] = norms
    median = np.median(norms)
    mad = np.median(np.abs(norms - median))
    z = 6.0
    hist = NormHistogram().update(torch.from_numpy(tokens))
    # bins are 0.34 % wide: the median and every deviation move by at most one bin
    assert robust_threshold(hist, z) == pytest.approx(median + z * 1.4826 * mad, abs=(1 + z * 1.4826) * 0.0035 * median)
    correction = HighNormRepair(z=z).fit(fit_statistics(tokens), BLOCK)
    assert float(correction.threshold_) == pytest.approx(robust_threshold(hist, z))
    probe = torch.ones(1, 1, 3, 2)
    probe[0, 0, 1] = 1000.0
    torch.testing.assert_close(correction.transform(probe), torch.ones(1, 1, 3, 2))


# -- blank -------------------------------------------------------------------------------------
def toy_zero_tokens(toy: ToyBackbone, side: int) -> np.ndarray:
    """The toy backbone's last-block tokens (final norm) for the zero image, by hand: the patch
    embedding has no bias, so each token is its position embedding through the residual blocks."""
    x = toy.pos.detach().double().numpy()[: side * side]
    for w in toy.mix:
        x = x + np.tanh(x @ w.detach().double().numpy())
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + toy.norm.eps)
    return x.reshape(side, side, -1)


def blank_fit(toy: ToyBackbone) -> BlankTemplate:
    last = toy.num_blocks - 1
    zero = encode(toy, torch.zeros(1, 3, 16, 16), [last]).tokens[last][0]
    return BlankTemplate().fit(FitStatistics({}, (4, 4), {last: zero}), last)


def test_blank_subtracts_the_zero_image_tokens(toy_backbone):
    correction = blank_fit(toy_backbone)
    close(correction.template_, toy_zero_tokens(toy_backbone, 4))
    tokens = torch.randn(2, 4, 4, 16)
    close(correction.transform(tokens), tokens.double().numpy() - toy_zero_tokens(toy_backbone, 4))
    corrected = attach(toy_backbone, correction).forward_features(torch.zeros(1, 3, 16, 16)).tokens[1]
    assert corrected.abs().max() < 1e-5  # the zero image itself becomes zero


def test_blank_at_another_grid_uses_the_backbone_or_resamples(toy_backbone):
    correction = blank_fit(toy_backbone)
    tokens = torch.randn(1, 2, 2, 16)
    # no backbone: the 4x4 template resampled bilinearly to 2x2, i.e. 2x2 block means
    resampled = toy_zero_tokens(toy_backbone, 4).reshape(2, 2, 2, 2, 16).mean(axis=(1, 3))
    close(correction.transform(tokens), tokens.double().numpy() - resampled)
    correction.prepare(toy_backbone)
    close(correction.transform(tokens), tokens.double().numpy() - toy_zero_tokens(toy_backbone, 2))


# -- all methods -------------------------------------------------------------------------------
def fitted_corrections() -> dict:
    rng = np.random.default_rng(3)
    real = positional_tokens(rng, grid=(4, 4), d=6)
    stats = fit_statistics(real, rng.normal(size=(4, 4, 6)) + 1.0)
    return {
        "blank": BlankTemplate().fit(stats, BLOCK),
        "zero-subspace": ZeroSubspace(k=3, renormalise=False).fit(stats, BLOCK),
        "top-pc": TopComponents(k=1).fit(stats, BLOCK),
        "position-pc": PositionComponents(mu=3).fit(stats, BLOCK),
        "high-norm": HighNormRepair(z=2.5).fit(stats, BLOCK),
        "high-norm-fixed": HighNormRepair(threshold=4.0).fit(stats, BLOCK),
    }


def test_round_trip_through_the_corrections_file(tmp_path):
    corrections = fitted_corrections()
    path = CorrectionSet(corrections, {"backbone": "toy:test"}).save(tmp_path / "corrections.safetensors")
    loaded = CorrectionSet.load(path)
    tokens = torch.from_numpy(positional_tokens(np.random.default_rng(9), n=3, grid=(4, 4))).float()
    tokens[0, 1, 2] *= 20  # an outlier for high-norm
    assert set(loaded) == set(corrections)
    for name, correction in corrections.items():
        again = loaded[name]
        assert type(again) is type(correction) and again.describe() == correction.describe()
        assert again.digest() == correction.digest()
        torch.testing.assert_close(again.transform(tokens), correction.transform(tokens), rtol=0, atol=0)
    assert loaded["zero-subspace"].k_ == 3


def test_methods_are_registered_and_validate_their_parameters():
    for name, cls in [("blank", BlankTemplate), ("zero-subspace", ZeroSubspace), ("top-pc", TopComponents),
                      ("position-pc", PositionComponents), ("high-norm", HighNormRepair)]:
        assert METHODS[name] is cls and cls.source and cls.requires
    for bad in (lambda: ZeroSubspace(k=0), lambda: TopComponents(k=1.5), lambda: PositionComponents(mu=0),
                lambda: HighNormRepair(threshold=-1.0), lambda: HighNormRepair(z=0.0)):
        with pytest.raises(SoapvitError):
            bad()
    with pytest.raises(SoapvitError, match="zero-image"):
        BlankTemplate().fit(fit_statistics(np.ones((2, 1, 1, 2))), BLOCK)


def test_blank_at_an_earlier_block_of_a_hooked_backbone_computes_its_template_outside_the_pass():
    """An hf backbone edits through forward hooks: the zero image's forward for a new grid must run
    before the corrected pass, not inside its hook (which would recurse)."""
    from transformers import Dinov2Config, Dinov2Model

    from soapvit.backbones.hf import HFBackbone
    from soapvit.corrections import attach
    from soapvit.corrections.blank import BlankTemplate

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                          patch_size=4, image_size=16)
    backbone = HFBackbone(Dinov2Model(config).eval(), "hf:tiny")
    zeros = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        template = backbone.forward_features(zeros, [1], norm=False).tokens[1][0]
    blank = BlankTemplate()
    blank.template_, blank.block_, blank.dim_ = template, 1, 16
    pixels = torch.randn(2, 3, 24, 20)  # another grid than the template's
    with torch.no_grad():
        corrected = attach(backbone, blank).forward_features(pixels, [2]).tokens[2]
        wide = backbone.forward_features(torch.zeros(1, 3, 24, 20), [1], norm=False).tokens[1][0]
        edit = {1: lambda seq: torch.cat([seq[:, :1], seq[:, 1:] - wide.reshape(1, -1, 16)], 1)}
        # the block-1 edit subtracts the zero image's residual stream at block 1 (the tokens it edits)
        expected = backbone.forward_features(pixels, [2], edits=edit).tokens[2]
    torch.testing.assert_close(corrected, expected)
