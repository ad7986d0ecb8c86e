"""kNN segmentation protocols: the CAPI per-pixel mode, its (k, distance) choice, Hungarian matching
of the hummingbird protocol, and both protocols end to end and from the CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import ColourBackbone
from eval_helpers import make_head
from PIL import Image
from test_eval_knnseg import seg_folder

from soapvit.backbones.registry import register_source
from soapvit.cli import main
from soapvit.data.segmentation import SegmentationSplit
from soapvit.errors import SoapvitError
from soapvit.eval.knn_capi import (bank_patches, choose_setting, held_out_images, nearest, patch_pixel_labels,
                                   pixel_mode, pixels_from_patches)
from soapvit.eval.metrics import SegmentationMetrics, class_counts, confusion_matrix
from soapvit.eval.knnseg import ConfusionMetrics, KnnConfig, evaluate_knnseg, hungarian_matching


def test_patch_pixel_labels_round_trip():
    labels = np.arange(4 * 6).reshape(4, 6)
    cells = patch_pixel_labels(labels, 2)
    assert cells.shape == (6, 4)
    assert cells[0].tolist() == [0, 1, 6, 7] and cells[4].tolist() == [14, 15, 20, 21]
    np.testing.assert_array_equal(pixels_from_patches(torch.from_numpy(cells), 2, 3, 2).numpy(), labels)


def test_nearest_cosine_and_l2_differ_as_computed_by_hand():
    bank = torch.tensor([[10.0, 0.5], [0.8, 0.3], [-1.0, 0.0]])
    query = torch.tensor([[1.0, 0.0]])
    # cosine: a 0.9988 > b 0.936 > c −1; squared L2: b 0.13 < c 4 < a 81.25
    assert nearest(query, bank, 3, "cosine").tolist() == [[0, 1, 2]]
    assert nearest(query, bank, 3, "l2").tolist() == [[1, 2, 0]]
    assert nearest(query, bank.half(), 2, "l2", memory_mb=1e-6).tolist() == [[1, 2]]  # float16 bank, tiny chunks


def test_pixel_mode_of_a_tiny_bank_known_by_hand():
    # bank of 5 patches of 2x2 pixels (P=4); classes 0..2, 9 = ignored
    bank = torch.tensor([[0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]])
    bank_labels = torch.tensor([[0, 0, 1, 9],
                                [0, 2, 1, 9],
                                [2, 2, 2, 9],
                                [1, 1, 1, 9],
                                [0, 0, 0, 0]])
    query = torch.tensor([[0.05, 1.0]])
    idx = nearest(query, bank, 3, "cosine")
    assert sorted(idx[0, :2].tolist()) == [0, 1] and idx[0, 2].item() == 3
    # pixel 0: 0,0,1 → 0; pixel 1: 0,2,1 → three-way tie → smallest, 0; pixel 2: 1,1,1 → 1;
    # pixel 3: 9,9,9 → the ignored label itself (CAPI's torch.mode counts every neighbour)
    assert pixel_mode(bank_labels[idx]).tolist() == [[0, 0, 1, 9]]
    assert pixel_mode(torch.tensor([[[1], [0]]])).tolist() == [[0]]  # 1:1 → smallest, not nearest
    assert pixel_mode(torch.tensor([[[2], [5], [5], [2], [5]]])).tolist() == [[5]]  # majority
    # a patch is in the bank when its most frequent label is a class (ties → smallest label)
    labels = torch.tensor([[9, 9, 1, 0], [1, 1, 9, 9], [3, 9, 9, 2], [2, 2, 2, 9]])
    assert bank_patches(labels, 3).tolist() == [False, True, False, True]


def test_capi_prediction_equals_a_scipy_recomputation_of_the_authors_classifier():
    """Standardise on the training part, k nearest by scipy's cdist, per-pixel scipy mode (ties to
    the smallest), patches whose modal label is ignored out of the bank: the authors' classifier
    rewritten with numpy/scipy, against nearest() + pixel_mode() + bank_patches()."""
    from scipy.spatial.distance import cdist
    from scipy.stats import mode

    rng = np.random.default_rng(3)
    train, test = rng.normal(size=(300, 6)), rng.normal(size=(40, 6))
    train[:, 0] *= 50.0  # a dimension that would dominate without the standardisation
    labels = rng.integers(0, 4, size=(300, 9))  # 3 classes and 3 = ignored
    mean, std = train.mean(0), train.std(0)
    a, b = (train - mean) / std, (test - mean) / std
    modal = mode(labels, axis=1, keepdims=False).mode
    keep = modal < 3
    bank, bank_labels = a[keep], labels[keep]
    for distance, metric in (("cosine", "cosine"), ("l2", "euclidean")):
        for k in (1, 3, 10):
            ref_idx = np.argsort(cdist(b, bank, metric=metric), axis=1, kind="stable")[:, :k]
            expected = mode(bank_labels[ref_idx], axis=1, keepdims=False).mode
            in_bank = bank_patches(torch.from_numpy(labels), 3).numpy()
            assert (in_bank == keep).all()
            idx = nearest(torch.from_numpy(b).float(), torch.from_numpy(bank).float(), k, distance)
            got = pixel_mode(torch.from_numpy(bank_labels)[idx]).numpy()
            np.testing.assert_array_equal(got, expected)


def test_a_voted_ignore_label_is_a_miss_of_the_pixels_class_only():
    gt = np.array([[0, 0, 1, 1], [2, 2, 7, 7]])  # 7 = ignored
    pred = np.array([[0, 3, 1, 1], [2, 0, 1, 2]])  # 3: outside the 3 classes (a voted ignore label)
    confusion = confusion_matrix(pred, gt, 3, 7)
    assert confusion.tolist() == [[1, 0, 0, 1], [0, 2, 0, 0], [1, 0, 1, 0]]
    # tp, fp, fn per class: class 0 lost a pixel to "outside" (a miss, nobody's false positive)
    assert class_counts(confusion).tolist() == [[1, 1, 1], [2, 0, 0], [1, 0, 1]]
    metrics = SegmentationMetrics(3, 7)
    metrics.add(pred, gt, 0)
    assert metrics.counts[0].tolist() == class_counts(confusion).tolist()


def test_choice_picks_the_known_best_k_and_distance():
    """Two classes separated only by norm along one direction (cosine cannot tell them apart, L2
    can) with 30% of the labels flipped (a large k recovers the true class, k=1 copies noise): the
    best is (30, l2). A choice that left the held-out images in the bank would match each query
    to itself and pick k=1."""
    g = torch.Generator().manual_seed(0)
    n_images, per_image = 100, 20
    true = torch.randint(0, 2, (n_images * per_image,), generator=g)
    direction = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    features = (1.0 + 2.0 * true.float())[:, None] * direction + 0.05 * torch.randn(len(true), 8, generator=g)
    flip = torch.rand(len(true), generator=g) < 0.3
    labels = torch.where(flip, 1 - true, true)[:, None]
    image = torch.arange(n_images).repeat_interleave(per_image)
    config = KnnConfig(protocol="capi")
    held_images = held_out_images(n_images, config)
    assert int(held_images.sum()) == 10
    k, distance, info = choose_setting(features, labels, held_images[image], 2, config)
    assert (k, distance) == (30, "l2")
    scores = info["miou"]
    assert set(scores) == {"cosine", "l2"} and set(scores["l2"]) == {1, 3, 10, 30}
    assert scores["l2"][30] > scores["l2"][1] + 5
    assert max(scores["cosine"].values()) < scores["l2"][30] - 5


def test_choice_ties_go_to_the_earlier_candidate_of_capis_grid(monkeypatch):
    """CAPI's grid is product(k, distance) and max() keeps the first best: with (3, cosine) and
    (1, l2) tied best, (1, l2) wins (a distance-first scan would pick (3, cosine))."""
    from soapvit.eval import knn_capi

    features = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0], [0], [0], [1], [1], [1], [0], [1]])
    held = torch.arange(8) >= 6
    scores = iter([50.0, 90.0, 90.0, 50.0])  # call order: cosine k=1, k=3, then l2 k=1, k=3
    monkeypatch.setattr(knn_capi, "_miou", lambda *args: next(scores))
    config = KnnConfig(protocol="capi", k_choices=(1, 3), distances=("cosine", "l2"))
    k, distance, info = choose_setting(features, labels, held, 2, config)
    assert info["miou"] == {"cosine": {1: 50.0, 3: 90.0}, "l2": {1: 90.0, 3: 50.0}}
    assert (k, distance) == (1, "l2")


def test_hungarian_matching_undoes_a_permutation():
    rng = np.random.default_rng(0)
    perm = np.array([2, 0, 3, 1])  # predicted class = perm[true class]
    metrics = ConfusionMetrics(4, 255)
    for i in range(5):
        gt = rng.integers(0, 4, (6, 7))
        gt[0, 0] = 255
        pred = perm[np.where(gt == 255, 0, gt)]
        if i == 0:
            pred[1, :3] = (pred[1, :3] + 1) % 4  # a few wrong pixels
        metrics.add(pred, gt, i)
    matched, assigned = metrics.matched()
    # predicted class p is renamed to the true class t with perm[t] = p
    assert assigned.tolist() == np.argsort(perm).tolist()
    result = matched.result()
    assert 95 < result["miou"] < 100 and result["acc"] == pytest.approx(100 * (1 - 3 / (5 * 41)), abs=1e-9)
    assert hungarian_matching(np.eye(3, dtype=int)[[1, 2, 0]]).tolist() == [2, 0, 1]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    base = tmp_path_factory.mktemp("seg")
    train, val = seg_folder(base / "train", 6, 0), seg_folder(base / "val", 4, 1)
    permuted = seg_folder(base / "permuted", 4, 1)  # val with class ids 0→1, 1→2, 2→0
    for path in (permuted / "labels").iterdir():
        labels = np.asarray(Image.open(path))
        Image.fromarray(np.where(labels == 255, 255, (labels + 1) % 3).astype(np.uint8)).save(path)
    return train, val, permuted


def test_hummingbird_hungarian_on_permuted_labels(colour_backbone, splits):
    train, permuted = SegmentationSplit.open(splits[0]), SegmentationSplit.open(splits[2], what="--val")
    plain = evaluate_knnseg(colour_backbone, train, permuted, config=KnnConfig(k=5, image_size=32))
    matched = evaluate_knnseg(colour_backbone, train, permuted, config=KnnConfig(k=5, image_size=32, hungarian=True))
    assert plain.results["original"]["miou"] < 10
    assert matched.results["original"]["miou"] > 80
    assert matched.results["original"]["hungarian_matching"] == {"0": "1", "1": "2", "2": "0"}
    assert matched.settings["protocol"] == "hummingbird" and matched.settings["hungarian"] is True
    with pytest.raises(SoapvitError, match="hungarian"):
        KnnConfig(protocol="capi", hungarian=True)


def test_capi_every_variant_its_own_standardisation_choice_and_interval(colour_backbone, splits):
    train, val = SegmentationSplit.open(splits[0]), SegmentationSplit.open(splits[1], what="--val")
    projector = torch.eye(12)
    projector[:6, :6] = 0  # drop half the dimensions: another variant with other statistics
    report = evaluate_knnseg(colour_backbone, train, val, corrections={"soap": make_head(projector)},
                             config=KnnConfig(protocol="capi", image_size=32, memory_mb=0.01))
    assert report.settings["protocol"] == "capi" and "temperature" not in report.settings
    for variant in ("original", "soap"):
        result = report.results[variant]
        assert result["miou"] > 90  # colours decide the class
        assert result["k"] in (1, 3, 10, 30) and result["distance"] in ("cosine", "l2")
        assert set(report.settings["selection"][variant]["miou"]) == {"cosine", "l2"}
        assert report.settings["selection"][variant]["held_out_images"] == 1  # 10% of 6 images, at least 1
    assert report.settings["selection"]["soap"] != report.settings["selection"]["original"]
    assert set(report.intervals) == {"soap"} and set(report.intervals["soap"]) == {"miou", "acc"}
    # scored at model resolution: 40x28 images → 32x32 squares (8x8 patches of 4); the void top row
    # of the 28 label rows becomes the first of 32 rows (nearest)
    counts = np.array(report.per_image["original"]["tp_fp_fn"])
    assert counts.shape == (4, 3, 3)
    labelled = counts[:, :, 0].sum(1) + counts[:, :, 2].sum(1)
    assert labelled.tolist() == [32 * 32 - 32] * 4
    assert report.bank_size == 6 * 8 * 8


def test_cli_knnseg_both_protocols(splits, tmp_path):
    register_source("toy")(lambda name: ColourBackbone())
    payloads = {}
    for protocol, extra in (("hummingbird", ["--k", "5", "--hungarian"]), ("capi", [])):
        out = tmp_path / f"{protocol}.json"
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "knnseg", "--model", "toy:colour", "--train", str(splits[0]), "--val", str(splits[1]),
                  "--protocol", protocol, "--image-size", "32", "--out", str(out), *extra])
        assert exit_info.value.code == 0
        payloads[protocol] = json.loads(out.read_text())
    hb, capi = payloads["hummingbird"], payloads["capi"]
    assert hb["settings"]["protocol"] == "hummingbird" and hb["settings"]["k"] == 5 and hb["settings"]["hungarian"]
    assert capi["settings"]["protocol"] == "capi" and "k" not in capi["settings"]
    assert capi["results"]["original"]["k"] in (1, 3, 10, 30)
    assert capi["results"]["original"]["distance"] in ("cosine", "l2")
    assert capi["settings"]["k_choices"] == [1, 3, 10, 30] and capi["settings"]["image_size"] == 32
    for payload in (hb, capi):
        assert payload["results"]["original"]["miou"] > 80
        sources = {k: payload["settings"][k] for k in ("train", "val", "dataset", "root", "head")}
        assert sources == {"train": str(splits[0]), "val": str(splits[1]), "dataset": None, "root": None, "head": None}
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "knnseg", "--model", "toy:colour", "--train", str(splits[0]), "--val", str(splits[1]),
              "--protocol", "nope"])
    assert exit_info.value.code != 0


def test_capi_standardises_each_variant_on_its_own_training_features(colour_backbone, splits):
    """A variant that scales token dimensions by 1000 and 0.001 is the original after its own
    standardisation: same choice, same scores (shared statistics would let one dimension decide)."""
    train, val = SegmentationSplit.open(splits[0]), SegmentationSplit.open(splits[1], what="--val")
    projector = torch.eye(12)
    projector[0, 0], projector[1, 1], projector[2, 2] = 1000.0, 1e-3, 1e-3
    report = evaluate_knnseg(colour_backbone, train, val, corrections={"scaled": make_head(projector)},
                             config=KnnConfig(protocol="capi", image_size=32))
    sel = report.settings["selection"]
    for distance in ("cosine", "l2"):
        for k in (1, 3, 10, 30):
            assert sel["scaled"]["miou"][distance][k] == pytest.approx(sel["original"]["miou"][distance][k], abs=0.5)
    assert report.results["scaled"]["miou"] == pytest.approx(report.results["original"]["miou"], abs=0.5)
