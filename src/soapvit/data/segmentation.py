"""Semantic-segmentation splits: images with integer label maps and an ignore index.

Layouts (``layout="auto"`` picks by the path, and for ``images/`` + ``labels/`` by the labels):

- ``camvid`` / ``folder``: a split folder holding ``images/`` and ``labels/`` (same stems), as
  ``../shared/data/camvid/{train,val,test}``; CamVid has 11 classes and void = 11; a generic
  folder has ignore 255 and as many classes as its labels show. ``auto`` takes CamVid when a
  folder on the path is named ``camvid``; otherwise it reads the label maps: ids 0..11 and
  nothing above (CamVid's convention, but also 12 classes without void) cannot be told apart and
  need ``--layout`` (or ``--ignore-index``); anything else is a generic folder;
- ``ade20k``: ``ADEChallengeData2016/images/{training,validation}`` with labels in the sibling
  ``annotations/<split>``; 0 ("other") is ignored, 1..150 become 0..149;
- ``voc``: a split list ``VOC2012/ImageSets/Segmentation/<split>.txt``; images in
  ``JPEGImages``, palette labels in ``SegmentationClass``; 21 classes, ignore 255;
- ``cityscapes``: ``leftImg8bit/<split>`` (city sub-folders, ``*_leftImg8bit.png``) with labels
  ``gtFine/<split>/<city>/*_gtFine_labelIds.png``; the 34 label ids map to the 19 train ids
  (:data:`CITYSCAPES_TRAIN_IDS`), every other id to 255 (ignored).

A label map that is no label map (a photo, a colour-coded map) is refused: the first one when
the split is opened (for a generic folder: any, as all are read to count the classes), a later
one as that image's read error, listed as skipped by the run.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import AnnotationError, DataFolderError, check_first_annotation, list_images, read_annotation
from .sources import AnnotatedImages

LAYOUTS = ("auto", "camvid", "folder", "ade20k", "voc", "cityscapes")
BY_LABELS = "auto: by the labels"
"""What :func:`_detect_layout` returns for ``images/`` + ``labels/`` without a ``camvid`` folder on the path."""
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist"]
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
ADE_NUM_CLASSES = 150
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]
CAMVID_VOID = len(CAMVID_CLASSES)
"""CamVid's void id (11), ignored."""
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
"""Cityscapes label id → train id (cityscapesScripts ``labels.py``); any other id is ignored (255)."""


@dataclass(frozen=True)
class SegmentationSample:
    stem: str
    image: Path
    label: Path


@dataclass
class SegmentationSplit(AnnotatedImages):
    """Image/label pairs of one split, with the label convention of its layout."""

    samples: list[SegmentationSample]
    num_classes: int
    ignore_index: int
    class_names: list[str]
    layout: str
    missing: list[Path] = field(default_factory=list)
    """images that have no label map"""

    def load_target(self, sample: SegmentationSample, size: tuple[int, int]) -> np.ndarray:
        """The label map at the image's size."""
        return self.load_labels(sample, size=size)

    def load_labels(self, sample: SegmentationSample, size: tuple[int, int] | None = None) -> np.ndarray:
        """Label map ``(H, W)`` int64 in this split's convention; resized (nearest, with a warning)
        when ``size = (W, H)`` differs. Class ids outside the split's classes (other than the
        ignore index) become the ignore index, with a warning giving their share of pixels."""
        stored = read_label_map(sample.label, size)
        if self.layout == "ade20k":
            labels = np.where(stored == 0, self.ignore_index, stored - 1)
        elif self.layout == "cityscapes":
            table = np.full(max(256, int(stored.max()) + 1), 255, np.int64)
            for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
                table[label_id] = train_id
            labels = np.where(table[stored] == 255, self.ignore_index, table[stored])
        else:
            labels = stored
        unknown = ((labels < 0) | (labels >= self.num_classes)) & (labels != self.ignore_index)
        if unknown.any():
            ids = np.unique(stored[unknown])
            shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
            warnings.warn(f"label map {sample.label}: {unknown.mean():.2%} of the pixels have class ids ({shown}) "
                          f"outside the {self.num_classes} classes of the {self.layout} layout: counted as "
                          f"ignored ({self.ignore_index})", stacklevel=2)
        return np.where(unknown, self.ignore_index, labels)

    @classmethod
    def open(cls, path: str | Path, *, layout: str = "auto", ignore_index: int | None = None,
             num_classes: int | None = None, what: str = "--train") -> SegmentationSplit:
        path = Path(path)
        if layout not in LAYOUTS:
            raise DataFolderError(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        if layout == "auto":
            layout = _detect_layout(path, what)
        values = None
        if layout == "voc":
            samples, missing = _voc_samples(path, what)
            names, ignore = VOC_CLASSES, 255
        elif layout == "cityscapes":
            samples, missing = _cityscapes_samples(path, what)
            names, ignore = CITYSCAPES_CLASSES, 255
        elif layout == "ade20k":
            labels_dir = path.parent.parent / "annotations" / path.name
            samples, missing = _pair_by_stem(path, labels_dir, what)
            names, ignore = [str(c) for c in range(ADE_NUM_CLASSES)], 255
        else:
            samples, missing = _pair_by_stem(path / "images", path / "labels", what)
            if layout == BY_LABELS:  # images/ + labels/ on a path without a camvid folder: the labels decide
                values = _label_values(samples, what)
                layout = _layout_from_labels(path, values, ignore_index, what)
            if layout == "camvid":
                names, ignore = CAMVID_CLASSES, CAMVID_VOID
            else:
                ignore = 255 if ignore_index is None else ignore_index
                if num_classes is None and values is None:
                    values = _label_values(samples, what)
                n = num_classes or _count_classes(values, ignore)
                names = [str(c) for c in range(n)]
        if values is None:  # unless every label map was read above
            check_first_annotation(samples[0].label, read_label_map, f"{what} labels")
        ignore = ignore if ignore_index is None else ignore_index
        names = names if num_classes is None else [str(c) for c in range(num_classes)]
        return cls(samples, len(names), ignore, list(names), layout, missing)


def read_label_map(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Class indices of a label PNG (grayscale or palette; never colour-converted)."""
    label = read_annotation(path, size, kind="label map")
    if label.mode not in ("L", "P", "I") and not label.mode.startswith("I;16"):
        raise AnnotationError(f"label map {path} has mode {label.mode}: expected class indices (L or P mode)")
    return np.asarray(label).astype(np.int64)


def _detect_layout(path: Path, what: str) -> str:
    if path.is_file() and path.suffix == ".txt":
        return "voc"
    if path.parent.name == "leftImg8bit" and (path.parent.parent / "gtFine" / path.name).is_dir():
        return "cityscapes"
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "camvid" if any(p.name.lower() == "camvid" for p in [path, *path.parents]) else BY_LABELS
    if path.parent.name == "images" and (path.parent.parent / "annotations" / path.name).is_dir():
        return "ade20k"
    raise DataFolderError(
        f"{what}: {path} is not a segmentation split (expected images/ + labels/, ADE20K images/<split> with "
        "annotations/<split>, or a VOC ImageSets/Segmentation/<split>.txt)"
    )


def _paired(candidates: Iterable[tuple[str, Path, Path | None]], none_found: str):
    """``(samples, missing)`` of ``(stem, image, label)`` candidates: an image whose label file is
    absent is missing; none paired is a :class:`DataFolderError` saying ``none_found``."""
    samples, missing = [], []
    for stem, image, label in candidates:
        if label is not None and label.is_file():
            samples.append(SegmentationSample(stem, image, label))
        else:
            missing.append(image)
    if not samples:
        raise DataFolderError(none_found)
    return samples, missing


def _pair_by_stem(images: Path, labels: Path, what: str):
    by_stem = {p.stem: p for p in list_images(labels, what=f"{what} labels")}
    return _paired(((p.stem, p, by_stem.get(p.stem)) for p in list_images(images, what=what)),
                   f"{what}: no label map in {labels} has the stem of an image in {images}")


def _cityscapes_samples(split: Path, what: str):
    """``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`` with ``gtFine/<split>/<city>/<id>_gtFine_labelIds.png``."""
    labels_root = split.parent.parent / "gtFine" / split.name

    def candidates():
        for image in list_images(split, what=what, recursive=True):
            stem = image.stem.removesuffix("_leftImg8bit")
            yield stem, image, labels_root / image.parent.relative_to(split) / f"{stem}_gtFine_labelIds.png"

    return _paired(candidates(), f"{what}: no image of {split} has a *_gtFine_labelIds.png in {labels_root}")


def _voc_samples(split_file: Path, what: str):
    root = split_file.parent.parent.parent
    stems = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    return _paired(((stem, root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClass" / f"{stem}.png")
                    for stem in stems),
                   f"{what}: none of the {len(stems)} ids in {split_file} has a label in {root}/SegmentationClass")


def _label_values(samples: list[SegmentationSample], what: str) -> np.ndarray:
    """The class ids found in the label maps of ``samples`` (sorted); a file that is no label
    map is a one-line error naming it."""
    found: set[int] = set()
    for s in samples:
        try:
            found.update(np.unique(read_label_map(s.label)).tolist())
        except AnnotationError as err:
            raise DataFolderError(f"{what} labels: {err}") from None
    return np.array(sorted(found), dtype=np.int64)


def _layout_from_labels(path: Path, values: np.ndarray, ignore_index: int | None, what: str) -> str:
    """``folder``, unless the ids are CamVid's (0..11 with void 11, nothing above) and no
    ``--ignore-index`` says which convention they follow: then ``--layout`` is needed."""
    camvid_like = len(values) and values.max() == CAMVID_VOID and values.min() >= 0
    if camvid_like and ignore_index is None:
        raise DataFolderError(
            f"{what}: the label maps of {path} hold ids {values.min()}..{CAMVID_VOID} and nothing above, CamVid's "
            f"convention (11 classes, void {CAMVID_VOID}) or {CAMVID_VOID + 1} classes without void, and no folder on "
            "its path is named camvid: pass --layout camvid (void ignored) or --layout folder (ignore 255)")
    return "folder"


def _count_classes(values: np.ndarray, ignore: int) -> int:
    """One more than the largest class id other than ``ignore`` (at least 1)."""
    values = values[values != ignore]
    return int(values.max()) + 1 if len(values) else 1
