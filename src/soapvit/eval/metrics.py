"""Dataset metrics: salient-object (TokenCut's definitions) and semantic segmentation.

Salient (as TokenCut defines them, Wang et al., CVPR 2022): predictions are 8-bit maps ``q ∈ {0..255}`` (a binary mask is 0/255;
a soft map is ``round(255·clip(p, 0, 1))``), so the metric sees exactly what is saved as PNG.
Ground truth: any non-zero pixel is foreground.

- IoU and accuracy of the prediction thresholded at 0.5 (``q ≥ 128``), per image, averaged.
  An image whose prediction and ground truth are both empty has IoU 1 (TokenCut's code would
  divide 0 by 0).
- maxFβ, β² = 0.3: at the 255 thresholds ``k/255, k = 0..254`` (``q > k``), per image
  precision (1 when nothing is predicted), recall (1 when the ground truth is empty) and
  ``F = (1+β²)PR / (β²P + R)`` (0 when undefined); averaged over images per threshold; maximum
  over thresholds.

Segmentation: a confusion matrix over labelled pixels (ignore index excluded); IoU per class
with a non-empty union, mIoU their mean, pixel accuracy.

Accumulators are sums, so the processes of a :mod:`torch.distributed` group each score their
share and :func:`across_ranks` adds them up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from .. import distributed

BETA_SQ = 0.3
N_THRESHOLDS = 255


def to_uint8(prediction: np.ndarray) -> np.ndarray:
    """Bool mask → {0, 255}; float map in [0, 1] → ``round(255·clip(p, 0, 1))``; uint8 kept."""
    if prediction.dtype == np.uint8:
        return prediction
    if prediction.dtype == bool:
        return prediction.astype(np.uint8) * 255
    return np.round(np.clip(prediction, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass
class ImageScores:
    """One image's salient scores."""

    iou: float
    accuracy: float
    f_curve: np.ndarray  # (255,) Fβ per threshold


def salient_scores(prediction: np.ndarray, ground_truth: np.ndarray) -> ImageScores:
    """Scores of one image; ``prediction`` as :func:`to_uint8` accepts, same shape as the mask."""
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {ground_truth.shape} sizes differ")
    q = to_uint8(prediction).reshape(-1)
    gt = ground_truth.reshape(-1) != 0
    pred = q >= 128
    union = np.count_nonzero(pred | gt)
    iou = np.count_nonzero(pred & gt) / union if union else 1.0
    accuracy = np.count_nonzero(pred == gt) / gt.size
    # counts of prediction levels among all pixels and among ground-truth pixels
    all_hist = np.bincount(q, minlength=256).astype(np.float64)
    gt_hist = np.bincount(q[gt], minlength=256).astype(np.float64)
    # predicted at threshold k: levels > k, k = 0..254
    predicted = np.cumsum(all_hist[::-1])[::-1][1:]
    true_pos = np.cumsum(gt_hist[::-1])[::-1][1:]
    gt_area = float(gt.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_pos / predicted, 1.0)
        recall = true_pos / gt_area if gt_area > 0 else np.ones(N_THRESHOLDS)
        f = (1 + BETA_SQ) * precision * recall / (BETA_SQ * precision + recall)
    return ImageScores(iou=float(iou), accuracy=float(accuracy), f_curve=np.nan_to_num(f, nan=0.0))


@dataclass
class SalientMetrics:
    """Accumulates :class:`ImageScores` over a dataset."""

    iou_sum: float = 0.0
    accuracy_sum: float = 0.0
    f_sum: np.ndarray = field(default_factory=lambda: np.zeros(N_THRESHOLDS))
    n_images: int = 0

    def add(self, prediction: np.ndarray, ground_truth: np.ndarray) -> ImageScores:
        scores = salient_scores(prediction, ground_truth)
        self.iou_sum += scores.iou
        self.accuracy_sum += scores.accuracy
        self.f_sum += scores.f_curve
        self.n_images += 1
        return scores

    def merge(self, other: SalientMetrics) -> SalientMetrics:
        self.iou_sum += other.iou_sum
        self.accuracy_sum += other.accuracy_sum
        self.f_sum = self.f_sum + other.f_sum
        self.n_images += other.n_images
        return self

    def result(self) -> dict:
        """``{"maxFbeta", "iou", "acc", "n_images"}``, metrics in percent."""
        n = max(self.n_images, 1)
        return {
            "maxFbeta": 100.0 * float((self.f_sum / n).max()) if self.n_images else 0.0,
            "iou": 100.0 * self.iou_sum / n,
            "acc": 100.0 * self.accuracy_sum / n,
            "n_images": self.n_images,
        }


@dataclass
class SegmentationMetrics:
    """Confusion matrix of integer label maps; pixels labelled ``ignore_index`` are skipped."""

    num_classes: int
    ignore_index: int | None = None
    confusion: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def add(self, prediction: np.ndarray, ground_truth: np.ndarray) -> None:
        if prediction.shape != ground_truth.shape:
            raise ValueError(f"prediction {prediction.shape} and labels {ground_truth.shape} sizes differ")
        gt = ground_truth.reshape(-1).astype(np.int64)
        pred = prediction.reshape(-1).astype(np.int64)
        keep = (gt >= 0) & (gt < self.num_classes)
        if self.ignore_index is not None:
            keep &= gt != self.ignore_index
        flat = gt[keep] * self.num_classes + pred[keep]
        self.confusion += np.bincount(flat, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def merge(self, other: SegmentationMetrics) -> SegmentationMetrics:
        self.confusion = self.confusion + other.confusion
        return self

    def per_class_iou(self) -> np.ndarray:
        """IoU per class, NaN where the class is neither labelled nor predicted."""
        tp = np.diag(self.confusion).astype(np.float64)
        union = self.confusion.sum(0) + self.confusion.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def result(self, class_names: list[str] | None = None) -> dict:
        """``{"miou", "acc", "per_class_iou": {name: iou}}`` in percent (absent classes left out)."""
        iou = self.per_class_iou()
        names = class_names or [str(c) for c in range(self.num_classes)]
        total = self.confusion.sum()
        return {
            "miou": 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "acc": 100.0 * float(np.trace(self.confusion) / total) if total else 0.0,
            "per_class_iou": {names[c]: 100.0 * float(v) for c, v in enumerate(iou) if np.isfinite(v)},
        }


Metrics = TypeVar("Metrics", SalientMetrics, SegmentationMetrics)


def across_ranks(metrics: dict[str, Metrics]) -> dict[str, Metrics]:
    """Every rank's accumulators by name, merged in rank order (a name some rank lacks is fine)."""
    merged: dict[str, Metrics] = {}
    for part in distributed.all_gather_objects(metrics):
        for name, accumulator in part.items():
            merged[name] = merged[name].merge(accumulator) if name in merged else accumulator
    return merged
