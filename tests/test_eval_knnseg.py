"""kNN segmentation: soft labels, chunked search against brute force, split layouts, end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ColourBackbone
from eval_helpers import make_head
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from soapvit.backbones.registry import register_source
from soapvit.cli import main
from soapvit.data.images import DataFolderError, ImageReadError
from soapvit.data.segmentation import CAMVID_CLASSES, SegmentationSplit
from soapvit.eval.knnseg import KnnConfig, evaluate_knnseg, knn_vote, patch_soft_labels

COLOURS = np.array([[20, 20, 200], [200, 30, 30], [30, 190, 40]])


def test_soft_labels_are_patch_histograms_without_ignore():
    labels = np.array([[0, 0, 1, 255], [0, 1, 255, 255], [2, 2, 2, 2], [2, 2, 1, 2]])
    hist, valid = patch_soft_labels(labels, 2, 3, 255)
    np.testing.assert_allclose(hist.numpy(), [[0.75, 0.25, 0], [0, 1, 0], [0, 0, 1], [0, 0.25, 0.75]])
    assert valid.tolist() == [True, True, True, True]
    hist, valid = patch_soft_labels(np.full((2, 2), 255), 2, 3, 255)
    assert valid.tolist() == [False] and hist.sum() == 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(1, 300), q=st.integers(1, 50), k=st.integers(1, 40),
       memory=st.sampled_from([1e-4, 1e-3, 256.0]))
def test_chunked_vote_equals_brute_force(seed, n, q, k, memory):
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(q, 8, generator=g), dim=1)
    labels = torch.softmax(torch.randn(n, 4, generator=g), 1)
    got = knn_vote(queries, bank, labels, k, 0.1, memory_mb=memory)
    sim = queries @ bank.T
    top, idx = sim.topk(min(k, n), dim=1)
    w = torch.softmax(top / 0.1, 1)
    expected = (w[:, :, None] * labels[idx]).sum(1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def seg_folder(root, n, seed, size=(40, 28)):
    """images/ + labels/: three colour classes in vertical bands at random positions, void = 255
    on a border row."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    w, h = size
    for i in range(n):
        cuts = np.sort(rng.integers(4, w - 4, 2))
        labels = np.zeros((h, w), np.uint8)
        labels[:, cuts[0] : cuts[1]] = 1
        labels[:, cuts[1] :] = 2
        image = COLOURS[labels] + rng.integers(-15, 15, (h, w, 3))
        labels[0] = 255
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(labels).save(root / "labels" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    base = tmp_path_factory.mktemp("seg")
    return seg_folder(base / "train", 6, 0), seg_folder(base / "val", 4, 1)


def test_folder_layout_counts_classes(splits):
    split = SegmentationSplit.open(splits[0])
    assert split.layout == "folder" and split.num_classes == 3 and split.ignore_index == 255


def test_knnseg_end_to_end_and_bank_cap(colour_backbone, splits):
    backbone = colour_backbone
    train, val = SegmentationSplit.open(splits[0]), SegmentationSplit.open(splits[1], what="--val")
    report = evaluate_knnseg(backbone, train, val, corrections={"soap": make_head(torch.eye(12))},
                             config=KnnConfig(k=5, image_size=32, memory_mb=0.01))
    assert report.results["original"]["miou"] > 80  # colours decide the class
    assert report.results["soap"] == report.results["original"]  # identity head
    assert report.intervals["soap"]["miou"] == {"delta": 0.0, "low": 0.0, "high": 0.0}
    assert report.per_image["soap"]["index"] == list(range(len(val)))
    # 40x28 → 44x32 input: 11x8 patches each; the void top row covers 1 of 4 pixel rows, so no patch is dropped
    assert report.bank_size == 6 * 8 * 11
    capped = evaluate_knnseg(backbone, train, val, config=KnnConfig(k=5, image_size=32, max_bank=100))
    assert capped.bank_size <= 100 and set(capped.results) == {"original"}


def test_camvid_layout_of_shared_data():
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"  # ../shared from the repository
    if not root.is_dir():
        pytest.skip(f"shared CamVid not present at {root}")
    train = SegmentationSplit.open(f"{root}/train")
    test = SegmentationSplit.open(f"{root}/test", what="--val")
    assert (train.layout, len(train), len(test)) == ("camvid", 367, 233)
    assert train.class_names == CAMVID_CLASSES and train.ignore_index == 11
    labels = train.load_labels(train.samples[0])
    assert labels.shape == (360, 480) and labels.max() <= 11


def test_ade20k_and_voc_layouts(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    for split in ("training",):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        Image.new("RGB", (6, 4)).save(ade / "images" / split / "ADE_1.jpg")
        Image.fromarray(np.array([[0, 1, 150]] * 4, np.uint8).repeat(2, 1)).save(ade / "annotations" / split / "ADE_1.png")
    split = SegmentationSplit.open(ade / "images" / "training")
    assert split.layout == "ade20k" and split.num_classes == 150
    np.testing.assert_array_equal(split.load_labels(split.samples[0])[0], [255, 255, 0, 0, 149, 149])

    voc = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(voc / "JPEGImages" / "a.jpg")
    pal = Image.fromarray(np.array([[0, 15, 255, 1]] * 4, np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 128, 0, 0] * 128)
    pal.save(voc / "SegmentationClass" / "a.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    split = SegmentationSplit.open(voc / "ImageSets/Segmentation/val.txt")
    assert split.layout == "voc" and len(split) == 1 and split.missing[0].name == "b.jpg"
    np.testing.assert_array_equal(split.load_labels(split.samples[0])[0], [0, 15, 255, 1])

    Image.new("RGB", (4, 4)).save(voc / "SegmentationClass" / "a.png")  # colour-coded labels
    with pytest.raises(ImageReadError, match="mode RGB"):
        split.load_labels(split.samples[0])
    with pytest.raises(DataFolderError, match="--train"):
        SegmentationSplit.open(tmp_path)


def test_cli_knnseg(splits, tmp_path):
    register_source("toy")(lambda name: ColourBackbone())
    out = tmp_path / "k.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "knnseg", "--model", "toy:colour", "--train", str(splits[0]), "--val", str(splits[1]),
              "--k", "5", "--image-size", "32", "--out", str(out)])
    assert exit_info.value.code == 0
    payload = json.loads(out.read_text())
    original = payload["results"]["original"]
    assert payload["kind"] == "knnseg" and set(original["per_class_iou"]) == {"0", "1", "2"}
    assert original["miou"] == pytest.approx(np.mean(list(original["per_class_iou"].values())))
