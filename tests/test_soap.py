import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soapvit.errors import SoapvitError
from soapvit.corrections.soap import (
    BlockDecomposition,
    SoapHead,
    auto_mu,
    component_weights,
    descending_rank,
    projector,
    semantic_invariance,
)


def test_si_hand_computed_cases():
    # p = q = 0.5: 2 * 0.5 / (2 * sqrt(0.5)) = sqrt(0.5)
    assert semantic_invariance(torch.tensor(0.5), torch.tensor(0.5)).item() == pytest.approx(math.sqrt(0.5))
    # p = 0.9, q = 0.2: 2 * (0.18 + 0.08) / (sqrt(.82) + sqrt(.68))
    expected = 2 * 0.26 / (math.sqrt(0.82) + math.sqrt(0.68))
    assert semantic_invariance(torch.tensor(0.9), torch.tensor(0.2)).item() == pytest.approx(expected)
    # opposite certain responses → 0, clamped to eps; identical certain responses → 1 - eps
    assert semantic_invariance(torch.tensor(1.0), torch.tensor(0.0), eps=1e-6).item() == pytest.approx(1e-6)
    assert semantic_invariance(torch.tensor(1.0), torch.tensor(1.0), eps=1e-6).item() == pytest.approx(1 - 1e-6)
    # alpha = 1 and gamma = 2 from the general formula
    p, q = 0.7, 0.4
    expected = 2 * (p * q + (1 - p) * (1 - q)) ** 2 / (1 + 1)
    assert semantic_invariance(torch.tensor(p), torch.tensor(q), alpha=1, gamma=2).item() == pytest.approx(expected)


@settings(max_examples=50, deadline=None)
@given(p=st.floats(0, 1), q=st.floats(0, 1))
def test_si_is_symmetric_sign_invariant_and_bounded(p, q):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    s = semantic_invariance(t(p), t(q)).item()
    assert s == pytest.approx(semantic_invariance(t(q), t(p)).item())
    # flipping an eigenvector's sign turns p, q into 1-p, 1-q
    assert s == pytest.approx(semantic_invariance(t(1 - p), t(1 - q)).item())
    assert 0 < s < 1


def test_reference_weights_keep_exactly_top_two():
    scores = torch.tensor([0.3, 0.9, 0.5, 0.95, 0.8], dtype=torch.float64)
    w = component_weights(scores, "reference", mu=2, tau=0.05)
    rank = descending_rank(scores)
    assert rank.tolist() == [4, 1, 3, 0, 2]
    expected = [s / (1 + math.exp(-(2 - 0.5 - r) / 0.05)) for s, r in zip(scores.tolist(), rank.tolist())]
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-12)
    assert w[3] == pytest.approx(0.95, rel=1e-9) and w[1] == pytest.approx(0.9, rel=1e-4)
    assert w[[0, 2, 4]].max() < 1e-4  # sigma(-10) * s at rank 2


def test_paper_weights_formula():
    scores = torch.tensor([0.3, 0.9, 0.5, 0.95, 0.8], dtype=torch.float64)
    mu, tau = 2.0, 0.5
    w = component_weights(scores, "paper", mu=mu, tau=tau)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ranks = [5, 2, 4, 1, 3]  # 1-indexed descending
    expected = [s * sig((mu - r) / tau) / sig(mu / tau) for s, r in zip(scores.tolist(), ranks)]
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-12)


def test_auto_mu_manual_and_si_weightings():
    scores = torch.tensor([0.8, 0.6, 0.76, 0.74], dtype=torch.float64)
    assert auto_mu(scores) == 2
    assert auto_mu(torch.tensor([0.8, 0.75, 0.6])) == 2  # the one rule: SI ≥ 0.75 is high
    w = component_weights(scores, "reference", mu=None, tau=0.05)
    assert w[0] > 0.79 and w[2] > 0.75 and w[1] < 1e-4 and w[3] < 1e-4
    assert component_weights(scores, "manual", components=[1, 3]).tolist() == [0, 1, 0, 1]
    assert torch.equal(component_weights(scores, "si"), scores)
    with pytest.raises(SoapvitError, match="out of range"):
        component_weights(scores, "manual", components=[4])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), dim=st.integers(2, 12))
def test_projector_symmetric_and_idempotent_for_binary_weights(seed, dim):
    g = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    binary = (torch.rand(dim, generator=g) > 0.5).double()
    p = projector(v, binary)
    torch.testing.assert_close(p, p.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-10)
    # removed directions are annihilated, kept ones untouched
    torch.testing.assert_close(p @ v, v * (1 - binary), rtol=0, atol=1e-10)
    soft = projector(v, torch.rand(dim, generator=g, dtype=torch.float64))
    torch.testing.assert_close(soft, soft.T, rtol=0, atol=1e-12)


def _head(dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    si = torch.rand(dim, generator=g, dtype=torch.float64)
    d = BlockDecomposition(mean=torch.randn(dim, dtype=torch.float64), eigenvalues=torch.arange(dim, 0, -1).double(),
                           eigenvectors=v, si=si, weights=component_weights(si, "reference"),
                           p_real=torch.rand(2, 2, dim).double(), q_synthetic=torch.rand(2, 2, dim).double(),
                           position_share=torch.rand(dim).double())
    return SoapHead({3: d}, 3, {"backbone": "toy:test", "variant": "reference"})


def test_head_save_load_roundtrip_and_transform(tmp_path):
    head = _head()
    path = head.save(tmp_path / "h.safetensors")
    loaded = SoapHead.load(path)
    assert loaded.apply_block == 3 and loaded.metadata["backbone"] == "toy:test"
    torch.testing.assert_close(loaded.blocks[3].si, head.blocks[3].si)
    torch.testing.assert_close(loaded.projector, head.projector, atol=1e-6, rtol=0)
    tokens = torch.randn(2, 3, 3, 6)
    expected = tokens.double().numpy() @ head.projector.double().numpy()
    np.testing.assert_allclose(loaded.transform(tokens).numpy(), expected, atol=1e-5)
    assert loaded.summary()["blocks"]["3"]["si"] == pytest.approx(head.blocks[3].si.tolist())


def test_head_load_rejects_bad_files(tmp_path):
    with pytest.raises(SoapvitError, match="does not exist"):
        SoapHead.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SoapvitError, match="bad.safetensors"):
        SoapHead.load(bad)


def test_components_without_variance_get_the_floor_si_and_are_never_removed():
    from soapvit.corrections.soap import component_weights, without_degenerate

    si = torch.tensor([0.2, 0.9, 0.8, 0.95], dtype=torch.float64)
    eigenvalues = torch.tensor([5.0, 2.0, 1.0, 1e-12], dtype=torch.float64)  # the last: LayerNorm's null direction
    kept = without_degenerate(si, eigenvalues)
    assert kept.tolist() == [0.2, 0.9, 0.8, 1e-6]
    weights = component_weights(kept, "reference", mu=2, tau=0.05)
    assert weights[3] < 1e-5 and weights[1] > 0.89 and weights[2] > 0.79
