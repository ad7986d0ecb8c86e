"""Single-object discovery (TokenCut, Wang et al., CVPR 2022, after LOST): one box per image, CorLoc.

Boxes are ``[x0, y0, x1, y1]`` in image pixels with exclusive ends (a box covering pixel columns
``0..9`` is ``[0, ·, 10, ·]``), so a box's area is ``(x1 − x0)(y1 − y0)``:

- predicted box: the bounding box of the seed's connected component upsampled (nearest) to the
  image, i.e. the patch-grid box scaled to image pixels exactly as the scored mask is;
- ground truth from a mask (saliency sets): ``components`` (default) gives one box per
  8-connected component of the non-zero pixels, ``bbox`` one box around all of them;
- VOC XML boxes are 1-based inclusive (``[xmin − 1, ymin − 1, xmax, ymax]`` here), COCO's
  ``[x, y, w, h]`` is ``[x, y, x + w, y + h]``.

CorLoc = share of images whose predicted box has IoU ≥ 0.5 with some ground-truth box (an image
with an empty prediction is a miss). Per-image hits are kept by dataset index, so a variant's
CorLoc is compared with the original's by a paired bootstrap (:func:`corloc_intervals`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .intervals import DEFAULTS, paired_interval

GT_BOXES = ("components", "bbox")
CORLOC_IOU = 0.5


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Bounding box ``[x0, y0, x1, y1]`` (exclusive ends) of the non-zero pixels; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def boxes_from_mask(mask: np.ndarray, mode: str = "components") -> np.ndarray:
    """Ground-truth boxes ``(n, 4)`` of a mask: one per 8-connected component, or one ``bbox``."""
    from scipy import ndimage

    if mode not in GT_BOXES:
        raise ValueError(f"gt boxes must be one of {', '.join(GT_BOXES)}, not {mode!r}")
    fg = np.asarray(mask) != 0
    if mode == "bbox":
        box = mask_box(fg)
        return np.zeros((0, 4)) if box is None else box[None]
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels) if s is not None]
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``boxes (n, 4)``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class ImageBox:
    box: list[float] | None
    best_iou: float

    @property
    def hit(self) -> bool:
        return self.best_iou >= CORLOC_IOU


@dataclass
class CorLocMetrics:
    """Per image (by dataset index): the predicted box and its best IoU with the ground truth."""

    items: dict[int, ImageBox] = field(default_factory=dict)
    gt: dict[int, list] = field(default_factory=dict)

    def add(self, index: int, box: np.ndarray | None, gt_boxes: np.ndarray) -> ImageBox:
        gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
        best = float(box_iou(box, gt_boxes).max()) if box is not None and len(gt_boxes) else 0.0
        item = ImageBox(None if box is None else [float(v) for v in box], best)
        self.items[int(index)] = item
        self.gt[int(index)] = gt_boxes.tolist()
        return item

    def merge(self, other: CorLocMetrics) -> CorLocMetrics:
        self.items.update(other.items)
        self.gt.update(other.gt)
        return self

    def hits(self, indices=None) -> np.ndarray:
        keys = sorted(self.items) if indices is None else list(indices)
        return np.array([self.items[i].hit for i in keys], dtype=np.float64)

    def result(self) -> dict:
        """``{"corloc" (percent), "n_images"}``."""
        hits = self.hits()
        return {"corloc": 100.0 * float(hits.mean()) if len(hits) else 0.0, "n_images": len(hits)}

    def per_image(self) -> dict:
        """Plain data to recompute CorLoc: image indices, predicted and ground-truth boxes, best IoU."""
        keys = sorted(self.items)
        return {"index": keys, "box": [self.items[i].box for i in keys], "gt_boxes": [self.gt[i] for i in keys],
                "best_iou": [self.items[i].best_iou for i in keys]}


def corloc_intervals(metrics: dict[str, CorLocMetrics], **options) -> dict:
    """Per variant other than ``original``: the paired interval of its CorLoc minus the original's
    (percent points) on the images both scored."""
    options = {**DEFAULTS, **options}
    base = metrics["original"]
    out = {}
    for name, m in metrics.items():
        if name == "original":
            continue
        common = sorted(set(base.items) & set(m.items))
        a, b = base.hits(common), m.hits(common)
        out[name] = {"corloc": paired_interval(lambda idx: 100 * (b[idx].mean(-1) - a[idx].mean(-1)), len(common),
                                               **options)}
    return out
