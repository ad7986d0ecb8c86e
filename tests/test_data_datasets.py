"""``--dataset NAME --root DIR``: each layout's reader on a small fixture with the real folder names
and label convention (ignore labels included), and the CLI on them."""

import json
import warnings

import numpy as np
import pytest
from conftest import ColourBackbone
from PIL import Image

from soapvit.backbones.registry import register_source
from soapvit.cli import main
from soapvit.data.datasets import open_discovery, open_segmentation
from soapvit.data.images import DataFolderError
from soapvit.data.segmentation import CITYSCAPES_CLASSES, VOC_CLASSES, SegmentationSplit

COLOURS = np.array([[20, 20, 200], [200, 30, 30], [30, 190, 40], [220, 220, 20]])


def _image(labels, rng):
    return Image.fromarray(np.clip(COLOURS[labels % 4] + rng.integers(-10, 10, (*labels.shape, 3)), 0, 255)
                           .astype(np.uint8))


def _voc_palette_png(labels, path):
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[:21] = np.random.default_rng(1).integers(0, 255, (21, 3))
    palette[255] = [224, 224, 192]  # VOC's border colour
    img.putpalette(palette.reshape(-1).tolist())
    img.save(path)


def test_voc_segmentation_palette_and_border(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.zeros((12, 16), np.int64)
    labels[3:9, 4:12] = 15  # person
    labels[2, 3:13] = 255  # object border: ignored
    for stem in ("2007_000032", "2007_000033"):
        _image(labels, rng).save(root / "JPEGImages" / f"{stem}.jpg")
        _voc_palette_png(labels, root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000034\n")
    assert Image.open(root / "SegmentationClass" / "2007_000032.png").mode == "P"
    train = open_segmentation("voc", tmp_path / "VOCdevkit", "train")
    assert (train.layout, train.num_classes, train.ignore_index, train.class_names) == ("voc", 21, 255, VOC_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = train.load_labels(train.samples[0])
    np.testing.assert_array_equal(loaded, labels)  # palette indices, not colours; 255 kept as ignore
    val = open_segmentation("voc", root, "val", what="--val")
    assert [s.stem for s in val.samples] == ["2007_000033"] and [p.name for p in val.missing] == ["2007_000034.jpg"]


def test_ade20k_zero_ignored_and_labels_shifted_down(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        Image.new("RGB", (4, 2)).save(ade / "images" / split / f"ADE_{split}_00000001.jpg")
        Image.fromarray(np.array([[0, 1, 2, 150], [150, 0, 7, 1]], np.uint8)).save(
            ade / "annotations" / split / f"ADE_{split}_00000001.png")
    for root in (tmp_path, ade):
        train = open_segmentation("ade20k", root, "train")
        assert train.num_classes == 150 and train.ignore_index == 255
        np.testing.assert_array_equal(train.load_labels(train.samples[0]), [[255, 0, 1, 149], [149, 255, 6, 0]])
    assert open_segmentation("ade20k", tmp_path, "val").samples[0].stem == "ADE_validation_00000001"


def cityscapes_fixture(root, rng):
    """leftImg8bit/<split>/<city>/<id>_leftImg8bit.png + gtFine/<split>/<city>/<id>_gtFine_labelIds.png."""
    ids = np.array([[7, 8, 11, 0], [26, 24, 33, 3], [1, 23, 21, 255]])  # 0, 1, 3: void; 255 never a train id
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("frankfurt",))):
        for city in cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for n in range(2):
                stem = f"{city}_000000_{n:06d}"
                big = np.kron(ids, np.ones((8, 8), np.int64))
                _image(big, rng).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                Image.fromarray(big.astype(np.uint8)).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
                # the colour and instance maps beside it are not label maps
                Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(
                    root / "gtFine" / split / city / f"{stem}_gtFine_color.png")
    return root


def test_cityscapes_label_ids_become_19_train_ids(tmp_path):
    root = cityscapes_fixture(tmp_path / "cityscapes", np.random.default_rng(0))
    train = open_segmentation("cityscapes", root, "train")
    assert len(train.samples) == 4 and train.num_classes == 19 and train.class_names == CITYSCAPES_CLASSES
    assert train.samples[0].label.name == "aachen_000000_000000_gtFine_labelIds.png"
    expected = np.array([[0, 1, 2, 255], [13, 11, 18, 255], [255, 10, 8, 255]])
    np.testing.assert_array_equal(train.load_labels(train.samples[0])[::8, ::8], expected)
    auto = SegmentationSplit.open(root / "leftImg8bit" / "val")
    assert auto.layout == "cityscapes" and len(auto.samples) == 2


def test_saliency_sets_by_their_folder_names(tmp_path):
    for folder, images, masks in (("DUTS-TE", "DUTS-TE-Image", "DUTS-TE-Mask"),
                                  ("DUT-OMRON", "DUT-OMRON-image", "pixelwiseGT-new-PNG"),
                                  ("ECSSD", "images", "masks")):
        (tmp_path / folder / images).mkdir(parents=True)
        (tmp_path / folder / masks).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / folder / images / "sun_a.jpg")
        Image.new("RGB", (8, 8)).save(tmp_path / folder / images / "sun_b.jpg")
        Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(tmp_path / folder / masks / "sun_a.png")
    for name, folder in (("duts", "DUTS-TE"), ("dut-omron", "DUT-OMRON"), ("ecssd", "ECSSD")):
        ds = open_discovery(name, tmp_path / folder)
        assert [s.stem for s in ds.samples] == ["sun_a"] and [p.name for p in ds.missing] == ["sun_b.jpg"]
        np.testing.assert_array_equal(ds.load_target(ds.samples[0], (8, 8)), np.eye(8, dtype=bool))
    assert len(open_discovery("duts", tmp_path).samples) == 1  # the parent of DUTS-TE works too
    with pytest.raises(DataFolderError, match="not a dut-omron folder"):
        open_discovery("dut-omron", tmp_path / "DUTS-TE")


def test_cli_knnseg_on_a_named_dataset(tmp_path):
    register_source("toy")(lambda name: ColourBackbone())
    root = cityscapes_fixture(tmp_path / "cs", np.random.default_rng(0))
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "knnseg", "--model", "toy:colour", "--dataset", "cityscapes", "--root", str(root),
              "--image-size", "24", "--out", str(out)])
    assert exit_info.value.code == 0
    payload = json.loads(out.read_text())
    assert payload["settings"]["layout"] == "cityscapes" and payload["settings"]["n_val"] == 2
    assert payload["settings"]["ignore_index"] == 255
    assert set(payload["results"]["original"]["per_class_iou"]) <= set(CITYSCAPES_CLASSES)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "knnseg", "--model", "toy:colour", "--dataset", "coco", "--root", str(root)])
    assert exit_info.value.code == 2
