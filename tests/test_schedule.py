"""The shared warm-up + cosine learning rate against hand-computed values."""

import math

import pytest

from soapvit.schedule import learning_rate


def test_warmup_then_cosine_hand_values():
    # 100 steps, 20 warm-up, peak 0.4, final 0.1
    assert learning_rate(0, 100, 20, 0.4, 0.1) == 0.0
    assert learning_rate(5, 100, 20, 0.4, 0.1) == pytest.approx(0.1)  # 0.4 · 5/20
    assert learning_rate(20, 100, 20, 0.4, 0.1) == pytest.approx(0.4)
    # step 40: a quarter of the decay, 0.1 + 0.3 · (1 + cos(π/4)) / 2
    assert learning_rate(40, 100, 20, 0.4, 0.1) == pytest.approx(0.1 + 0.15 * (1 + math.sqrt(0.5)))
    assert learning_rate(60, 100, 20, 0.4, 0.1) == pytest.approx(0.25)
    assert learning_rate(100, 100, 20, 0.4, 0.1) == pytest.approx(0.1)
    assert learning_rate(130, 100, 20, 0.4, 0.1) == pytest.approx(0.1)


def test_fraction_of_run_equals_steps_and_no_warmup_starts_at_peak():
    assert learning_rate(0.3, 1.0, 0.1, 2.0) == pytest.approx(learning_rate(30, 100, 10, 2.0))
    assert learning_rate(0, 50, 0, 1.0) == pytest.approx(1.0)
