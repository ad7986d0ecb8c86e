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

Accumulators keep every image's scores by dataset index (so that variants can be compared image
by image, :mod:`.intervals`); the processes of a :mod:`torch.distributed` group each score their
share and :func:`across_ranks` merges them.
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
    """:class:`ImageScores` of a dataset by image index."""

    scores: dict[int, ImageScores] = field(default_factory=dict)

    def add(self, prediction: np.ndarray, ground_truth: np.ndarray, index: int | None = None) -> ImageScores:
        """Score one image (``index``: its dataset index; default the next free one)."""
        scores = salient_scores(prediction, ground_truth)
        self.scores[len(self.scores) if index is None else int(index)] = scores
        return scores

    def merge(self, other: SalientMetrics) -> SalientMetrics:
        self.scores.update(other.scores)
        return self

    @property
    def n_images(self) -> int:
        return len(self.scores)

    def arrays(self, indices=None) -> dict[str, np.ndarray]:
        """Per-image ``iou``, ``acc`` ``(n,)`` and ``fbeta`` ``(n, 255)`` in index order (or ``indices``)."""
        keys = sorted(self.scores) if indices is None else list(indices)
        rows = [self.scores[i] for i in keys]
        return {"iou": np.array([r.iou for r in rows]), "acc": np.array([r.accuracy for r in rows]),
                "fbeta": np.array([r.f_curve for r in rows]).reshape(len(rows), N_THRESHOLDS)}

    def result(self) -> dict:
        """``{"maxFbeta", "iou", "acc", "n_images"}``, metrics in percent."""
        if not self.scores:
            return {"maxFbeta": 0.0, "iou": 0.0, "acc": 0.0, "n_images": 0}
        a = self.arrays()
        return {"maxFbeta": 100.0 * float(a["fbeta"].mean(0).max()), "iou": 100.0 * float(a["iou"].mean()),
                "acc": 100.0 * float(a["acc"].mean()), "n_images": self.n_images}

    def per_image(self) -> dict:
        """Plain data to recompute every metric: image indices, IoU, accuracy and Fβ per threshold
        (one number where an image's curve is flat, as it is for a binary mask)."""
        keys = sorted(self.scores)
        a = self.arrays(keys)
        curves = [float(c[0]) if np.all(c == c[0]) else c.tolist() for c in a["fbeta"]]
        return {"index": keys, "iou": a["iou"].tolist(), "acc": a["acc"].tolist(), "fbeta": curves}


@dataclass
class SegmentationMetrics:
    """Per-image true positives, false positives and false negatives per class of integer label
    maps; pixels labelled ``ignore_index`` are skipped."""

    num_classes: int
    ignore_index: int | None = None
    counts: dict[int, np.ndarray] = field(default_factory=dict)  # index → (C, 3) tp, fp, fn

    def add(self, prediction: np.ndarray, ground_truth: np.ndarray, index: int | None = None) -> None:
        if prediction.shape != ground_truth.shape:
            raise ValueError(f"prediction {prediction.shape} and labels {ground_truth.shape} sizes differ")
        self.counts[len(self.counts) if index is None else int(index)] = class_counts(
            confusion_matrix(prediction, ground_truth, self.num_classes, self.ignore_index))

    def merge(self, other: SegmentationMetrics) -> SegmentationMetrics:
        self.counts.update(other.counts)
        return self

    @property
    def n_images(self) -> int:
        return len(self.counts)

    def stacked(self, indices=None) -> np.ndarray:
        """``(n, C, 3)`` per-image tp, fp, fn in index order (or ``indices``)."""
        keys = sorted(self.counts) if indices is None else list(indices)
        return np.stack([self.counts[i] for i in keys]) if keys else np.zeros((0, self.num_classes, 3), np.int64)

    def result(self, class_names: list[str] | None = None) -> dict:
        """``{"miou", "acc", "per_class_iou": {name: iou}}`` in percent (absent classes left out)."""
        total = self.stacked().sum(0)
        iou = class_iou(total)
        names = class_names or [str(c) for c in range(self.num_classes)]
        labelled = total[:, 0].sum() + total[:, 2].sum()
        return {
            "miou": 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "acc": 100.0 * float(total[:, 0].sum() / labelled) if labelled else 0.0,
            "per_class_iou": {names[c]: 100.0 * float(v) for c, v in enumerate(iou) if np.isfinite(v)},
        }

    def per_image(self) -> dict:
        """Plain data to recompute every metric: image indices and per-class ``[tp, fp, fn]``."""
        keys = sorted(self.counts)
        return {"index": keys, "tp_fp_fn": self.stacked(keys).tolist()}


def confusion_matrix(prediction: np.ndarray, labels: np.ndarray, num_classes: int,
                     ignore_index: int | None = None) -> np.ndarray:
    """``(C, C + 1)`` pixel counts, rows the label, columns the prediction, the last column a
    prediction outside ``0..C-1`` (a voted ignore label, say). Pixels whose label is outside
    ``0..C-1`` or ``ignore_index`` are left out."""
    gt = np.asarray(labels).reshape(-1).astype(np.int64)
    pred = np.asarray(prediction).reshape(-1).astype(np.int64)
    c = num_classes
    keep = (gt >= 0) & (gt < c)
    if ignore_index is not None:
        keep &= gt != ignore_index
    gt, pred = gt[keep], pred[keep]
    pred = np.where((pred >= 0) & (pred < c), pred, c)
    return np.bincount(gt * (c + 1) + pred, minlength=c * (c + 1)).reshape(c, c + 1)


def class_counts(confusion: np.ndarray) -> np.ndarray:
    """``(C, 3)`` true positives, false positives, false negatives of a :func:`confusion_matrix`
    (a prediction outside the classes is a false negative of the pixel's class only)."""
    c = confusion.shape[0]
    tp = np.diag(confusion[:, :c])
    return np.stack([tp, confusion[:, :c].sum(0) - tp, confusion.sum(1) - tp], axis=1)


def class_iou(counts: np.ndarray) -> np.ndarray:
    """IoU per class from summed ``(..., C, 3)`` tp, fp, fn; NaN where the union is empty."""
    union = counts.sum(-1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, counts[..., 0] / union, np.nan)


Metrics = TypeVar("Metrics")


def across_ranks(metrics: dict[str, Metrics]) -> dict[str, Metrics]:
    """Every rank's accumulators by name (any with a ``merge``: salient, segmentation, CorLoc),
    merged in rank order (a name some rank lacks is fine)."""
    merged: dict[str, Metrics] = {}
    for part in distributed.all_gather_objects(metrics):
        for name, accumulator in part.items():
            merged[name] = merged[name].merge(accumulator) if name in merged else accumulator
    return merged
