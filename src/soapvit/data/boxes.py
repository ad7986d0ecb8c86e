"""Object-box datasets for single-object discovery (CorLoc): images with ground-truth boxes.

Boxes are ``[x0, y0, x1, y1]`` float in image pixels with exclusive ends (:mod:`soapvit.eval.discovery`).

- VOC (``VOCdevkit/VOC2007`` or ``VOC2012``): ``JPEGImages/<id>.jpg`` and ``Annotations/<id>.xml``
  (``<object><bndbox>`` 1-based inclusive ``xmin ymin xmax ymax``, ``<truncated>``, ``<difficult>``);
  the ids of ``ImageSets/Main/<split>.txt`` when a split is given, else every XML file.
  ``drop_hard``: objects that are truncated or difficult are removed from the ground truth and an
  image left without objects (all its objects hard) is dropped (LOST / TokenCut ``remove_hards``).
- COCO: an ``instances_*.json`` (``images`` with ``id`` and ``file_name``, ``annotations`` with
  ``image_id`` and ``bbox = [x, y, w, h]``) and its image folder; images without an annotation
  are left out (listed in ``missing``).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import DataFolderError
from .sources import AnnotatedImages


@dataclass(frozen=True)
class BoxSample:
    stem: str
    image: Path
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass
class BoxDataset(AnnotatedImages):
    """Images and their ground-truth boxes; the target is a ``(n, 4)`` float array."""

    samples: list[BoxSample]
    missing: list[Path] = field(default_factory=list)
    source: str = "boxes"
    dropped: list[str] = field(default_factory=list)
    """ids left out because all their objects are truncated or difficult"""

    def load_target(self, sample: BoxSample, size: tuple[int, int]) -> np.ndarray:
        return np.array(sample.boxes, dtype=np.float64).reshape(-1, 4)

    @classmethod
    def from_voc(cls, root: str | Path, split: str | None = None, *, drop_hard: bool = False,
                 limit: int | None = None) -> BoxDataset:
        root = Path(root)
        annotations = root / "Annotations"
        if not annotations.is_dir():
            raise DataFolderError(f"--root: {root} has no Annotations/ folder (a VOC2007 or VOC2012 folder)")
        if split is not None:
            listing = root / "ImageSets" / "Main" / f"{split}.txt"
            if not listing.is_file():
                raise DataFolderError(f"--split: {listing} does not exist")
            ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        else:
            ids = sorted(p.stem for p in annotations.glob("*.xml"))
        samples, missing, dropped = [], [], []
        for stem in ids:
            xml = annotations / f"{stem}.xml"
            if not xml.is_file():
                missing.append(root / "JPEGImages" / f"{stem}.jpg")
                continue
            boxes = []
            for obj in read_voc_objects(xml):
                if drop_hard and (obj["truncated"] or obj["difficult"]):
                    continue
                boxes.append(obj["box"])
            if not boxes:
                dropped.append(stem)
                continue
            samples.append(BoxSample(stem, root / "JPEGImages" / f"{stem}.jpg", tuple(boxes)))
        if not samples:
            raise DataFolderError(f"--root: no image with a usable box in {annotations}")
        return cls(samples[:limit] if limit else samples, missing, "voc", dropped)

    @classmethod
    def from_coco(cls, annotations: str | Path, images: str | Path, *, limit: int | None = None) -> BoxDataset:
        annotations, images = Path(annotations), Path(images)
        try:
            data = json.loads(annotations.read_text())
            by_image: dict[int, list] = {}
            for a in data["annotations"]:
                x, y, w, h = (float(v) for v in a["bbox"])
                by_image.setdefault(int(a["image_id"]), []).append((x, y, x + w, y + h))
            entries = sorted(data["images"], key=lambda im: im["file_name"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataFolderError(f"--annotations: {annotations} is not a COCO instances file ({err})") from None
        samples, missing = [], []
        for im in entries:
            path = images / im["file_name"]
            if int(im["id"]) in by_image:
                samples.append(BoxSample(Path(im["file_name"]).stem, path, tuple(by_image[int(im["id"])])))
            else:
                missing.append(path)
        if not samples:
            raise DataFolderError(f"--annotations: no image of {annotations} has a box")
        return cls(samples[:limit] if limit else samples, missing, "coco")


def read_voc_objects(path: Path) -> list[dict]:
    """The objects of a VOC XML file: ``name``, ``box`` (exclusive ends, 0-based), ``truncated``, ``difficult``."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as err:
        raise DataFolderError(f"{path}: not a VOC annotation ({err})") from None
    objects = []
    for obj in tree.getroot().iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        flag = lambda tag: (obj.findtext(tag) or "0").strip() == "1"  # noqa: E731
        objects.append({"name": obj.findtext("name"), "box": (xmin - 1, ymin - 1, xmax, ymax),
                        "truncated": flag("truncated"), "difficult": flag("difficult")})
    return objects
