"""``--dataset NAME --root DIR``: the layouts users hold, each resolved to one reader.

Salient-object and object-box sets (``eval tokencut``):

- ``ecssd`` / ``folder``: ``ROOT/images`` + ``ROOT/masks`` (or TokenCut's ``img`` + ``gt``);
- ``duts``: DUTS-TE, ``ROOT/DUTS-TE-Image`` + ``ROOT/DUTS-TE-Mask`` (ROOT the ``DUTS-TE`` folder or its parent);
- ``dut-omron``: ``ROOT/DUT-OMRON-image`` + ``ROOT/pixelwiseGT-new-PNG``;
- ``voc``: ``ROOT`` = ``VOC2007`` / ``VOC2012`` (or a ``VOCdevkit`` holding one), ``Annotations/*.xml`` boxes;
- ``coco``: ``ROOT/annotations/instances_<split>.json`` with images in ``ROOT/<split>``.

Segmentation sets (``eval knnseg``, :func:`open_segmentation`; ``split`` in the user's words,
``train``/``val``/``test``, or the layout's own folder name):

- ``ade20k``: ``ROOT`` = ``ADEChallengeData2016`` (or its parent), ``images/{training,validation}``;
- ``voc``: ``ImageSets/Segmentation/<split>.txt`` of a VOC2012 root;
- ``cityscapes``: ``ROOT/leftImg8bit/<split>`` with ``ROOT/gtFine/<split>``;
- ``camvid`` / ``folder``: ``ROOT/<split>`` holding ``images/`` and ``labels/``.
"""

from __future__ import annotations

from pathlib import Path

from .boxes import BoxDataset
from .images import DataFolderError
from .saliency import SaliencyDataset
from .segmentation import SegmentationSplit

SEGMENTATION = ("ade20k", "voc", "cityscapes", "camvid", "folder")
DEFAULT_SPLITS = {"ade20k": ("train", "val"), "voc": ("train", "val"), "cityscapes": ("train", "val"),
                  "camvid": ("train", "test"), "folder": ("train", "val")}
ADE_SPLITS = {"train": "training", "val": "validation"}

DISCOVERY = ("ecssd", "duts", "dut-omron", "folder", "voc", "coco")
SALIENT_FOLDERS = {"ecssd": [("images", "masks"), ("img", "gt")], "folder": [("images", "masks")],
                   "duts": [("DUTS-TE-Image", "DUTS-TE-Mask"), ("DUTS-TE/DUTS-TE-Image", "DUTS-TE/DUTS-TE-Mask")],
                   "dut-omron": [("DUT-OMRON-image", "pixelwiseGT-new-PNG"),
                                 ("DUT-OMRON-image/DUT-OMRON-image", "pixelwiseGT-new-PNG")]}


def _salient_folders(name: str, root: Path) -> tuple[Path, Path]:
    for images, masks in SALIENT_FOLDERS[name]:
        if (root / images).is_dir() and (root / masks).is_dir():
            return root / images, root / masks
    expected = " or ".join(f"{i}/ + {m}/" for i, m in SALIENT_FOLDERS[name])
    raise DataFolderError(f"--root: {root} is not a {name} folder (expected {expected})")


def voc_root(root: Path) -> Path:
    """A VOC2007/VOC2012 folder: ``root`` itself or the one ``VOC20xx`` inside a ``VOCdevkit``."""
    if (root / "JPEGImages").is_dir() or (root / "Annotations").is_dir():
        return root
    inside = sorted(p for p in root.glob("VOC20*") if p.is_dir())
    if len(inside) == 1:
        return inside[0]
    raise DataFolderError(f"--root: {root} is not a VOC folder (JPEGImages/, Annotations/, SegmentationClass/)"
                          + (f"; it holds {', '.join(p.name for p in inside)}: name one" if inside else ""))


def coco_files(root: Path, split: str | None) -> tuple[Path, Path]:
    """``(instances JSON, image folder)`` of a COCO root."""
    if split is None:
        found = sorted((root / "annotations").glob("instances_*.json"))
        if len(found) != 1:
            raise DataFolderError(f"--root: {root}/annotations holds {len(found)} instances_*.json files; pass --split")
        split = found[0].stem.removeprefix("instances_")
    annotations, images = root / "annotations" / f"instances_{split}.json", root / split
    if not annotations.is_file() or not images.is_dir():
        raise DataFolderError(f"--root: expected {annotations} and the image folder {images}")
    return annotations, images


def open_discovery(name: str | None, root: Path | None, *, images: Path | None = None, masks: Path | None = None,
                   split: str | None = None, drop_hard: bool = False,
                   limit: int | None = None) -> SaliencyDataset | BoxDataset:
    """The dataset of ``eval tokencut``: explicit ``images`` (+ ``masks``) folders, or ``name`` under ``root``."""
    if name is None:
        if images is None:
            raise DataFolderError("--images: pass an image folder (and --masks), or --dataset NAME --root DIR")
        return SaliencyDataset.from_folders(images, masks, limit=limit)
    if name not in DISCOVERY:
        raise DataFolderError(f"--dataset must be one of {', '.join(DISCOVERY)}, not {name!r}")
    if root is None:
        raise DataFolderError(f"--dataset {name} needs --root DIR")
    root = Path(root)
    if name == "voc":
        return BoxDataset.from_voc(voc_root(root), split, drop_hard=drop_hard, limit=limit)
    if name == "coco":
        return BoxDataset.from_coco(*coco_files(root, split), limit=limit)
    return SaliencyDataset.from_folders(*_salient_folders(name, root), limit=limit)


def segmentation_path(name: str, root: Path, split: str) -> Path:
    """The path :meth:`SegmentationSplit.open` reads for ``split`` of the ``name`` layout under ``root``."""
    root = Path(root)
    if name == "ade20k":
        base = root if (root / "images").is_dir() else root / "ADEChallengeData2016"
        return base / "images" / ADE_SPLITS.get(split, split)
    if name == "voc":
        return voc_root(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    if name == "cityscapes":
        return root / "leftImg8bit" / split
    return root / split


def open_segmentation(name: str, root: Path | None, split: str, *, ignore_index: int | None = None,
                      num_classes: int | None = None, what: str = "--train") -> SegmentationSplit:
    """``split`` of the segmentation set ``name`` under ``root``, in the layout's label convention."""
    if name not in SEGMENTATION:
        raise DataFolderError(f"--dataset must be one of {', '.join(SEGMENTATION)} for a segmentation, not {name!r}")
    if root is None:
        raise DataFolderError(f"--dataset {name} needs --root DIR")
    path = segmentation_path(name, root, split)
    if not path.exists():
        raise DataFolderError(f"{what}: {path} does not exist (the {split!r} split of a {name} root)")
    return SegmentationSplit.open(path, layout=name, ignore_index=ignore_index, num_classes=num_classes, what=what)
