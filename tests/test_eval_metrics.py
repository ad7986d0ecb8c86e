"""Salient and segmentation metrics against hand-computed cases and a direct recomputation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soapvit.eval.metrics import SalientMetrics, SegmentationMetrics, salient_scores, to_uint8


def test_hand_computed_binary_case():
    gt = np.array([[0, 255, 255], [0, 255, 0]], dtype=np.uint8)  # 3 foreground pixels
    pred = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)  # 3 predicted, 2 correct
    s = salient_scores(pred, gt)
    assert s.iou == pytest.approx(2 / 4)
    assert s.accuracy == pytest.approx(4 / 6)
    p = r = 2 / 3
    f = 1.3 * p * r / (0.3 * p + r)
    np.testing.assert_allclose(s.f_curve, f)  # a 0/255 mask is the same at every threshold < 1


def test_soft_prediction_thresholds():
    gt = np.array([[1, 1, 0, 0]])
    pred = np.array([[200, 100, 50, 0]], dtype=np.uint8)
    s = salient_scores(pred, gt)
    # IoU at 0.5: only 200 ≥ 128 → intersection 1, union 2
    assert s.iou == pytest.approx(0.5)
    assert s.accuracy == pytest.approx(3 / 4)
    # k < 50: predicts 3 pixels (P=2/3, R=1); 50 ≤ k < 100: 2 pixels (P=R=1); 100 ≤ k < 200: P=1, R=1/2;
    # k ≥ 200: nothing predicted → P=1, R=0 → F=0
    f = lambda p, r: 1.3 * p * r / (0.3 * p + r) if p + r else 0.0
    expected = [f(2 / 3, 1)] * 50 + [f(1, 1)] * 50 + [f(1, 0.5)] * 100 + [0.0] * 55
    np.testing.assert_allclose(s.f_curve, expected)


def test_empty_cases():
    empty = np.zeros((2, 2), dtype=np.uint8)
    s = salient_scores(empty, empty)
    assert s.iou == 1.0 and s.accuracy == 1.0
    # nothing predicted, nothing to find: precision 1, recall 1 → F = 1 (TokenCut's convention)
    np.testing.assert_allclose(s.f_curve, 1.0)
    s = salient_scores(empty, np.ones((2, 2)))
    assert s.iou == 0.0 and s.accuracy == 0.0
    np.testing.assert_allclose(s.f_curve, 0.0)


def test_dataset_maxf_averages_per_threshold_then_maxes():
    gts = [np.array([[1, 1, 0, 0]]), np.array([[0, 1, 1, 1]])]
    preds = [np.array([[200, 100, 50, 0]], np.uint8), np.array([[10, 250, 250, 30]], np.uint8)]
    m = SalientMetrics()
    curves = [m.add(p, g).f_curve for p, g in zip(preds, gts)]
    res = m.result()
    assert res["n_images"] == 2
    assert res["maxFbeta"] == pytest.approx(100 * np.max((curves[0] + curves[1]) / 2))
    # not the mean of per-image maxima
    assert res["maxFbeta"] < 100 * np.mean([c.max() for c in curves])
    assert res["iou"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_f_curve_equals_direct_threshold_loop(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((7, 9))
    gt = rng.random((7, 9)) < 0.4
    q = to_uint8(pred)
    got = salient_scores(pred, gt).f_curve
    for k in range(255):
        mask = q > k
        tp = (mask & gt).sum()
        p = tp / mask.sum() if mask.sum() else 1.0
        r = tp / gt.sum() if gt.sum() else 1.0
        f = 1.3 * p * r / (0.3 * p + r) if (0.3 * p + r) > 0 else 0.0
        assert got[k] == pytest.approx(f)


def test_to_uint8():
    np.testing.assert_array_equal(to_uint8(np.array([True, False])), [255, 0])
    np.testing.assert_array_equal(to_uint8(np.array([-0.2, 0.5, 1.3, 0.999])), [0, 128, 255, 255])


def test_segmentation_hand_case():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 0]])
    m = SegmentationMetrics(num_classes=3, ignore_index=255)
    m.add(pred, gt)
    res = m.result(["a", "b", "c"])
    # class 0: tp 1, union 2 → .5; class 1: tp 2, union 4 → .5; class 2: tp 0, union 1 → 0
    assert res["per_class_iou"] == pytest.approx({"a": 50.0, "b": 50.0, "c": 0.0})
    assert res["miou"] == pytest.approx(100 / 3)
    assert res["acc"] == pytest.approx(60.0)


def test_segmentation_absent_class_left_out():
    m = SegmentationMetrics(num_classes=4, ignore_index=3)
    m.add(np.array([0, 1, 1]), np.array([0, 1, 3]))
    res = m.result()
    assert set(res["per_class_iou"]) == {"0", "1"}
    assert res["miou"] == pytest.approx(100.0)
