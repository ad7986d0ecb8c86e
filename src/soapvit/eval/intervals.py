"""Paired bootstrap confidence intervals of a variant-vs-original difference, over images.

Both variants are scored on the same images, so the images are resampled once per bootstrap
draw and the difference of the two dataset metrics is recomputed on that draw (a paired
bootstrap; BCa intervals from :func:`scipy.stats.bootstrap`, percentile where BCa is undefined,
e.g. when every image scores the same under both variants). Dataset metrics are recomputed
from per-image data exactly as the full-dataset figure is: maxFβ as the maximum over thresholds
of the per-threshold mean, mIoU from the summed per-class counts of the drawn images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats

from .metrics import class_iou

DEFAULTS = {"n_resamples": 2000, "confidence": 0.95, "seed": 0}


def paired_interval(statistic: Callable[[np.ndarray], np.ndarray], n: int, *, n_resamples: int = 2000,
                    confidence: float = 0.95, seed: int = 0) -> dict:
    """``{"delta", "low", "high"}`` for ``statistic(indices (..., n)) → (...)``, a difference of
    dataset metrics over the images ``indices`` (both variants on the same draw)."""
    delta = float(statistic(np.arange(n)[None])[0])
    if n < 2:
        return {"delta": delta, "low": delta, "high": delta}
    low = high = None
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap((np.arange(n),), lambda idx, axis=-1: statistic(np.asarray(idx)),
                                  vectorized=True, n_resamples=n_resamples, confidence_level=confidence,
                                  method=method, random_state=np.random.default_rng(seed), batch=64)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(low) and np.isfinite(high):
            break
    if not (np.isfinite(low) and np.isfinite(high)):  # every draw gives the same difference
        low = high = delta
    return {"delta": delta, "low": low, "high": high}


def _draw(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return values[idx.reshape(-1)].reshape(*idx.shape, *values.shape[1:])


def salient_intervals(base: dict[str, np.ndarray], other: dict[str, np.ndarray], **options) -> dict:
    """Intervals of ``other − base`` for maxFβ, IoU and accuracy (percent points), from per-image
    arrays of :meth:`~soapvit.eval.metrics.SalientMetrics.arrays` on the same images."""
    n = len(base["iou"])
    if all(np.all(a["fbeta"] == a["fbeta"][:, :1]) for a in (base, other)):  # binary masks: flat curves
        base, other = ({**a, "fbeta": a["fbeta"][:, :1]} for a in (base, other))

    def max_f(idx):
        return 100 * (_draw(other["fbeta"], idx).mean(-2).max(-1) - _draw(base["fbeta"], idx).mean(-2).max(-1))

    def mean_of(key):
        return lambda idx: 100 * (_draw(other[key], idx).mean(-1) - _draw(base[key], idx).mean(-1))

    return {"maxFbeta": paired_interval(max_f, n, **options), "iou": paired_interval(mean_of("iou"), n, **options),
            "acc": paired_interval(mean_of("acc"), n, **options)}


def segmentation_intervals(base: np.ndarray, other: np.ndarray, **options) -> dict:
    """Intervals of ``other − base`` for mIoU and pixel accuracy (percent points), from per-image
    ``(n, C, 3)`` tp, fp, fn counts on the same images."""

    def miou(counts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(class_iou(counts), axis=-1)

    def acc(counts):
        labelled = counts[..., 0].sum(-1) + counts[..., 2].sum(-1)
        return counts[..., 0].sum(-1) / np.maximum(labelled, 1)

    def diff(metric):
        return lambda idx: 100 * (metric(_draw(other, idx).sum(-3)) - metric(_draw(base, idx).sum(-3)))

    return {"miou": paired_interval(diff(miou), len(base), **options),
            "acc": paired_interval(diff(acc), len(base), **options)}


def against_original(metrics: dict, **options) -> dict:
    """Per variant other than ``original``: intervals of its difference to ``original`` on the
    images both scored (salient or segmentation accumulators of :mod:`.metrics`)."""
    from .metrics import SalientMetrics

    options = {**DEFAULTS, **options}
    base = metrics["original"]
    out = {}
    for name, m in metrics.items():
        if name == "original" or "/" in name:
            continue
        if isinstance(m, SalientMetrics):
            common = sorted(set(base.scores) & set(m.scores))
            out[name] = salient_intervals(base.arrays(common), m.arrays(common), **options)
        else:
            common = sorted(set(base.counts) & set(m.counts))
            out[name] = segmentation_intervals(base.stacked(common), m.stacked(common), **options)
    return out


def bootstrap_settings(**options) -> dict:
    """What the intervals were computed with (recorded in every report)."""
    return {**DEFAULTS, **options, "method": "paired bootstrap over images, BCa (percentile where BCa is undefined)"}
