"""Pooling heads, LARS, schedule, kNN and attention statistics against hand/numpy references."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soapvit.aggregate.attention import cls_attention_statistics, distribution_statistics
from soapvit.aggregate.heads import AbMILPPool, ClsPool, MeanPool, ProbeClassifier, make_pool, sincos_position_embedding
from soapvit.aggregate.train import LARS, knn_scores, learning_rate, topk_accuracy
from soapvit.errors import SoapvitError


def test_abmilp_matches_hand_computed_example():
    pool = AbMILPPool(2)
    with torch.no_grad():
        pool.scorer[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        pool.scorer[0].bias.zero_()
    ln2, ln3 = math.log(2), math.log(3)
    patches = torch.tensor([[[0.0, 1.0], [ln2, 2.0], [ln3, -1.0]]])
    pooled, weights = pool(torch.zeros(1, 1, 2), patches)
    # scores 0, ln2, ln3 → exp 1, 2, 3 → weights 1/6, 2/6, 3/6
    assert weights[0].tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert pooled[0].tolist() == pytest.approx([(2 * ln2 + 3 * ln3) / 6, (1 + 4 - 3) / 6])


def test_deep_tanh_scorer_matches_numpy():
    torch.manual_seed(0)
    pool = AbMILPPool(5, depth=3, activation="tanh")
    x = torch.randn(2, 7, 5)
    w = [(m.weight.detach().numpy().astype(np.float64), m.bias.detach().numpy().astype(np.float64))
         for m in pool.scorer if isinstance(m, torch.nn.Linear)]
    h = x.numpy().astype(np.float64)
    for W, b in w[:-1]:
        h = np.tanh(h @ W.T + b)
    scores = (h @ w[-1][0].T + w[-1][1])[..., 0]
    expected_w = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    pooled, weights = pool(torch.zeros(2, 0, 5), x)
    np.testing.assert_allclose(weights.detach().numpy(), expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled.detach().numpy(), np.einsum("bn,bnd->bd", expected_w, x.numpy()), rtol=1e-5,
                               atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), side=st.integers(1, 4), depth=st.integers(1, 3),
       activation=st.sampled_from(["relu", "tanh", "gelu"]), attention=st.sampled_from(["none", "map", "both"]),
       conditioning=st.sampled_from(["none", "pe"]), scale=st.floats(0.01, 100.0))
def test_abmilp_weights_are_a_distribution_per_image(batch, side, depth, activation, attention, conditioning, scale):
    dim = 8
    pool = AbMILPPool(dim, depth=depth, activation=activation, self_attention=attention, conditioning=conditioning,
                      grid=(side, side))
    patches = torch.randn(batch, side * side, dim) * scale
    pooled, weights = pool(torch.zeros(batch, 1, dim), patches)
    assert weights.shape == (batch, side * side) and pooled.shape == (batch, dim)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(batch))


def test_self_attention_map_changes_scores_but_pools_the_raw_patches():
    torch.manual_seed(1)
    patches = torch.randn(3, 5, 4)
    for mode in ("map", "both"):
        pool = AbMILPPool(4, self_attention=mode)
        pooled, weights = pool(torch.zeros(3, 0, 4), patches)
        values = patches if mode == "map" else pool.attention(patches)
        torch.testing.assert_close(pooled, torch.einsum("bn,bnd->bd", weights, values))


def test_sincos_embedding_follows_the_formula():
    dim, h, w = 8, 2, 3
    table = sincos_position_embedding(h, w, dim).numpy()
    omega = 1.0 / 10000 ** (np.arange(2) / 2)
    for r in range(h):
        for c in range(w):
            expected = np.concatenate([np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)])
            np.testing.assert_allclose(table[r * w + c], expected, atol=1e-6)
    assert (sincos_position_embedding(2, 2, 10)[:, 8:] == 0).all()


def test_cls_and_mean_pools_and_classifier():
    prefix, patches = torch.randn(4, 2, 3), torch.randn(4, 6, 3)
    torch.testing.assert_close(ClsPool()(prefix, patches)[0], prefix[:, 0])
    torch.testing.assert_close(MeanPool()(prefix, patches)[0], patches.mean(1))
    clf = ProbeClassifier(make_pool("mean", 3), 3, 5).eval()
    logits, weights = clf(prefix, patches)
    assert weights is None and logits.shape == (4, 5)
    with pytest.raises(SoapvitError, match="--pool"):
        make_pool("max", 3)
    with pytest.raises(SoapvitError, match="no CLS"):
        ClsPool()(torch.zeros(2, 0, 3), patches)
    with pytest.raises(SoapvitError, match="grid"):
        AbMILPPool(3, conditioning="pe")


def test_lars_step_by_hand():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖p‖ = 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([weight, bias], lr=0.5, weight_decay=0.0, momentum=0.9, trust_coefficient=0.01)
    weight.grad = torch.tensor([[0.0, 2.0]])  # ‖g‖ = 2 → trust 0.01·5/2 = 0.025
    bias.grad = torch.tensor([4.0])
    opt.step()
    assert weight[0].tolist() == pytest.approx([3.0, 4.0 - 0.5 * 0.025 * 2.0])
    assert bias.tolist() == pytest.approx([1.0 - 0.5 * 4.0])
    opt.step()  # momentum: m = 0.9 m + step
    assert bias.tolist() == pytest.approx([1.0 - 0.5 * 4.0 - 0.5 * (0.9 * 4.0 + 4.0)])


def test_learning_rate_warmup_then_cosine():
    assert learning_rate(0, 100, 10, 1.0) == 0.0
    assert learning_rate(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert learning_rate(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert learning_rate(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert learning_rate(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    top1, top2 = topk_accuracy(scores, labels, ks=(1, 2))
    assert top1 == pytest.approx(1 / 3) and top2 == pytest.approx(2 / 3)


def test_knn_scores_match_brute_force():
    rng = np.random.default_rng(0)
    bank, query = rng.normal(size=(40, 6)), rng.normal(size=(7, 6))
    labels = rng.integers(0, 4, size=40)
    k, t = 5, 0.1
    got = knn_scores(torch.tensor(bank), torch.tensor(labels), torch.tensor(query), k=k, temperature=t,
                     num_classes=4, chunk=3).numpy()
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    sim = q @ b.T
    expected = np.zeros((7, 4))
    for i in range(7):
        for j in np.argsort(-sim[i])[:k]:
            expected[i, labels[j]] += np.exp(sim[i, j] / t)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_distribution_statistics_by_hand_and_scipy():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    entropy, count = distribution_statistics(w)
    np.testing.assert_allclose(entropy.numpy(), scipy.stats.entropy(w.numpy(), axis=1))
    assert count.tolist() == [3, 4, 1]  # cumsum .5 .8 .95 → 3; uniform needs ⌈0.9·4⌉; a one-hot needs 1
    uniform = torch.full((1, 10), 0.1, dtype=torch.float32)
    e, c = distribution_statistics(uniform)
    assert float(e) == pytest.approx(math.log(10), rel=1e-6) and int(c) == 9


def test_cls_attention_statistics_renormalise_over_patches():
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 0] = torch.tensor([0.4, 0.2, 0.3, 0.06, 0.04])  # CLS, register, 3 patches
    stats = cls_attention_statistics(attn, num_prefix=2)
    p = np.array([0.3, 0.06, 0.04]) / 0.4
    assert float(stats["patch_mass"]) == pytest.approx(0.4)
    assert float(stats["entropy"]) == pytest.approx(scipy.stats.entropy(p))
    assert int(stats["count90"]) == 2  # 0.75 + 0.15 = 0.90
