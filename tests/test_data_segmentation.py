import warnings

import numpy as np
import pytest
from PIL import Image

from soapvit.data.images import ImageReadError
from soapvit.data.segmentation import SegmentationSplit, read_label_map


def _camvid_split(tmp_path, labels: np.ndarray) -> SegmentationSplit:
    root = tmp_path / "camvid" / "train"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.new("RGB", labels.shape[::-1]).save(root / "images" / "a.jpg")
    Image.fromarray(labels.astype(np.uint8)).save(root / "labels" / "a.png")
    return SegmentationSplit.open(root)


def test_camvid_ids_beyond_its_classes_become_ignored_with_their_share(tmp_path):
    labels = np.array([[0, 10, 11, 12], [13, 3, 255, 4]])
    split = _camvid_split(tmp_path, labels)
    with pytest.warns(UserWarning, match=r"a.png: 37.50% of the pixels have class ids \(12, 13, 255\) outside the "
                                         r"11 classes of the camvid layout: counted as ignored \(11\)"):
        loaded = split.load_labels(split.samples[0])
    np.testing.assert_array_equal(loaded, [[0, 10, 11, 11], [11, 3, 11, 4]])


def test_labels_within_the_classes_load_without_warning(tmp_path):
    labels = np.array([[0, 10, 11, 5]])
    split = _camvid_split(tmp_path, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(split.load_labels(split.samples[0]), labels)


def test_ade20k_ids_beyond_150_are_reported_as_stored(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    (ade / "images" / "training").mkdir(parents=True)
    (ade / "annotations" / "training").mkdir(parents=True)
    Image.new("RGB", (4, 1)).save(ade / "images" / "training" / "x.jpg")
    Image.fromarray(np.array([[0, 1, 150, 151]], np.uint8)).save(ade / "annotations" / "training" / "x.png")
    split = SegmentationSplit.open(ade / "images" / "training")
    with pytest.warns(UserWarning, match=r"25.00% of the pixels have class ids \(151\)"):
        np.testing.assert_array_equal(split.load_labels(split.samples[0]), [[255, 0, 149, 255]])


def test_sixteen_bit_label_maps_keep_their_ids(tmp_path):
    labels = np.array([[0, 300], [1000, 7]], np.uint16)
    Image.fromarray(labels).save(path := tmp_path / "l16.png")
    np.testing.assert_array_equal(read_label_map(path), labels)
    Image.new("RGB", (2, 2)).save(path)
    with pytest.raises(ImageReadError, match="l16.png has mode RGB"):
        read_label_map(path)
