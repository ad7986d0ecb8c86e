import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soapvit.stats import ResponseCounts, StreamingMoments, principal_components


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), seed=st.integers(0, 2**16), offset=st.floats(-1e3, 1e3))
def test_moments_match_numpy_over_unequal_chunks(sizes, seed, offset):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(sum(sizes) + 2, 6)) * rng.uniform(0.1, 10, size=6) + offset
    moments = StreamingMoments(6)
    start = 0
    for n in sizes + [2]:
        moments.update(torch.from_numpy(data[start:start + n]))
        start += n
    assert moments.count == len(data)
    assert _rel(moments.mean.numpy(), data.mean(0)) < 1e-10
    assert _rel(moments.covariance().numpy(), np.cov(data, rowvar=False)) < 1e-10


@settings(max_examples=20, deadline=None)
@given(split=st.lists(st.integers(1, 50), min_size=2, max_size=5), seed=st.integers(0, 2**16))
def test_merging_accumulators_equals_one_pass(split, seed):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(sum(split), 5)) + 100.0
    parts, start = [], 0
    for n in split:
        parts.append(StreamingMoments(5).update(torch.from_numpy(data[start:start + n])))
        start += n
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert _rel(merged.covariance().numpy(), np.cov(data, rowvar=False)) < 1e-10
    assert _rel(merged.mean.numpy(), data.mean(0)) < 1e-10


def test_state_dict_roundtrip_and_resume():
    data = torch.randn(100, 4, dtype=torch.float64)
    first = StreamingMoments(4).update(data[:37])
    resumed = StreamingMoments.from_state_dict(first.state_dict()).update(data[37:])
    np.testing.assert_allclose(resumed.covariance().numpy(), np.cov(data.numpy(), rowvar=False), rtol=1e-12)


def test_principal_components_descending_and_orthonormal():
    data = torch.randn(500, 5, dtype=torch.float64) * torch.tensor([5.0, 1.0, 3.0, 0.5, 2.0])
    moments = StreamingMoments(5).update(data)
    values, vectors = principal_components(moments)
    assert torch.all(values[:-1] >= values[1:])
    np.testing.assert_allclose((vectors.T @ vectors).numpy(), np.eye(5), atol=1e-12)
    cov = np.cov(data.numpy(), rowvar=False)
    np.testing.assert_allclose(cov @ vectors.numpy(), vectors.numpy() * values.numpy(), atol=1e-9)
    np.testing.assert_allclose(values.numpy(), np.sort(np.linalg.eigvalsh(cov))[::-1], rtol=1e-10)


def test_response_counts_match_numpy():
    rng = np.random.default_rng(3)
    tokens = rng.normal(size=(7, 3, 2, 4))
    mean = rng.normal(size=4)
    comps = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    counts = ResponseCounts.zeros((3, 2), 4)
    counts.update(torch.from_numpy(tokens[:3]), torch.from_numpy(mean), torch.from_numpy(comps))
    counts.update(torch.from_numpy(tokens[3:]), torch.from_numpy(mean), torch.from_numpy(comps))
    expected_centred = (((tokens - mean) @ comps) > 0).sum(0)
    expected_raw = ((tokens @ comps) >= 0).sum(0)
    assert counts.images == 7
    np.testing.assert_array_equal(counts.centred.numpy(), expected_centred)
    np.testing.assert_array_equal(counts.raw.numpy(), expected_raw)
    np.testing.assert_allclose(counts.probabilities("raw").numpy(), expected_raw / 7)


def test_float32_rows_keep_float32_accuracy():
    rng = np.random.default_rng(7)
    data = (rng.normal(size=(3000, 8)) * 3 + 50).astype(np.float32)
    moments = StreamingMoments(8)
    for chunk in np.array_split(data, 7):
        moments.update(torch.from_numpy(chunk))
    expected = np.cov(data.astype(np.float64), rowvar=False)
    assert moments.mean.dtype == torch.float64
    assert _rel(moments.covariance().numpy(), expected) < 1e-5
