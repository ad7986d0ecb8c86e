"""TokenCut's two named protocols and single-object discovery: boxes, CorLoc against an independent
recomputation from saved masks and saved boxes, VOC / COCO box readers, the CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import ColourBackbone
from eval_helpers import make_head
from PIL import Image

from soapvit.backbones.registry import register_source
from soapvit.cli import main
from soapvit.data.boxes import BoxDataset
from soapvit.data.datasets import open_discovery
from soapvit.data.saliency import SaliencyDataset
from soapvit.eval.discovery import CorLocMetrics, box_iou, boxes_from_mask, mask_box
from soapvit.eval.salient import TokenCutConfig, evaluate_tokencut

RECTS = {  # per image: rectangles (x0, y0, x1, y1), exclusive ends, on a 48 × 40 image
    "a": [(4, 4, 20, 16)],
    "b": [(2, 2, 14, 12), (26, 20, 44, 36)],  # two objects: two ground-truth components
    "c": [(10, 8, 38, 30)],
    "d": [(28, 2, 46, 18), (2, 24, 16, 38)],
    "e": [(16, 14, 32, 26)],
}


def plain_iou(a, b):
    """IoU of two exclusive-end boxes, written out."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


@pytest.fixture(scope="module")
def boxes_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("boxes")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem, rects in RECTS.items():
        image = np.full((40, 48, 3), 40, np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        for k, (x0, y0, x1, y1) in enumerate(rects):
            image[y0:y1, x0:x1] = [220, 60 + 100 * k, 40]
            mask[y0:y1, x0:x1] = 255
        image = np.clip(image + rng.integers(-8, 8, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def test_box_iou_and_mask_boxes_by_hand():
    # 10×10 box against one shifted by 5: inter 50, union 150
    np.testing.assert_allclose(box_iou(np.array([0, 0, 10, 10.0]), np.array([[5, 0, 15, 10], [20, 20, 30, 30]])),
                               [1 / 3, 0.0])
    mask = np.zeros((6, 8), bool)
    mask[1:3, 1:3] = True  # component 1
    mask[3, 3] = True  # touches component 1 diagonally: 8-connected, same component
    mask[4:6, 6:8] = True  # component 2
    assert mask_box(mask).tolist() == [1, 1, 8, 6]
    assert mask_box(np.zeros((3, 3))) is None
    assert sorted(boxes_from_mask(mask).tolist()) == [[1, 1, 4, 4], [6, 4, 8, 6]]
    assert boxes_from_mask(mask, "bbox").tolist() == [[1, 1, 8, 6]]
    corloc = CorLocMetrics()
    corloc.add(0, np.array([0, 0, 10, 10.0]), np.array([[50, 50, 60, 60], [0, 0, 10, 20.0]]))  # IoU 0.5: a hit
    corloc.add(1, np.array([0, 0, 10, 10.0]), np.array([[0, 0, 10, 21.0]]))  # IoU 100/210: a miss
    corloc.add(2, None, np.array([[0, 0, 1, 1.0]]))  # nothing predicted: a miss
    assert corloc.result() == {"corloc": pytest.approx(100 / 3), "n_images": 3}


def test_protocols_are_named_with_their_settings():
    tc, soap = TokenCutConfig(protocol="tokencut"), TokenCutConfig()
    assert (tc.features, tc.tau, tc.eps) == ("keys", 0.2, 1e-5)
    assert (soap.protocol, soap.features, soap.tau, soap.eps) == ("soap", "tokens", 0.3, 1e-5)
    assert TokenCutConfig(protocol="tokencut", tau=0.25).tau == 0.25
    assert (TokenCutConfig(protocol="tokencut", features="tokens").tau) == 0.3
    assert TokenCutConfig(protocol="soap", features="keys").tau == 0.2


def test_corloc_equals_recomputation_from_saved_masks_and_boxes(colour_backbone, boxes_folder, tmp_path):
    ds = SaliencyDataset.from_folders(boxes_folder / "images", boxes_folder / "masks")
    lossy = make_head(torch.diag(torch.tensor([1.0] * 2 + [0.0] * 10)))
    report = evaluate_tokencut(colour_backbone, ds, corrections={"soap": lossy},
                               config=TokenCutConfig(tau=0.2, batch_size=2), save_masks=tmp_path)
    stems = [s.stem for s in ds.samples]
    for variant, folder in (("original", tmp_path), ("soap", tmp_path / "soap")):
        hits, ious = [], []
        for stem in stems:
            pred = np.asarray(Image.open(folder / f"{stem}.png")) > 127
            ys, xs = np.where(pred)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # exclusive ends
            best = max(plain_iou(box, r) for r in RECTS[stem])  # the hand-made rectangles
            ious.append(best)
            hits.append(best >= 0.5)
        assert report.results[variant]["corloc"] == pytest.approx(100 * np.mean(hits))
        saved = report.per_image[variant]["corloc"]
        np.testing.assert_allclose(saved["best_iou"], ious)
        # and from the saved boxes alone
        again = [b is not None and max(plain_iou(b, g) for g in gts) >= 0.5
                 for b, gts in zip(saved["box"], saved["gt_boxes"])]
        assert report.results[variant]["corloc"] == pytest.approx(100 * np.mean(again))
        assert [sorted(map(tuple, g)) for g in saved["gt_boxes"]] == [sorted(RECTS[s]) for s in stems]
    assert report.results["original"]["corloc"] >= 60  # the colour toy finds its rectangles
    ci = report.intervals["soap"]["corloc"]
    assert ci["delta"] == pytest.approx(report.results["soap"]["corloc"] - report.results["original"]["corloc"])
    assert ci["low"] <= ci["delta"] <= ci["high"]
    assert report.settings["protocol"] == "soap" and report.settings["corloc_boxes"] == "mask components"
    one_box = evaluate_tokencut(colour_backbone, ds, config=TokenCutConfig(tau=0.2, gt_boxes="bbox"))
    gt = one_box.per_image["original"]["corloc"]["gt_boxes"]
    assert gt[stems.index("b")] == [[2, 2, 44, 36]]


VOC_XML = """<annotation><filename>{stem}.jpg</filename>{objects}</annotation>"""
VOC_OBJECT = ("<object><name>{name}</name><truncated>{t}</truncated><difficult>{d}</difficult>"
              "<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def voc_fixture(root):
    """VOC2007 layout: JPEGImages, Annotations (1-based inclusive boxes), ImageSets/Main/trainval.txt."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    objects = {"000001": [("cat", 0, 0, (5, 5, 20, 16))],
               "000002": [("dog", 1, 0, (1, 1, 10, 10)), ("dog", 0, 1, (20, 20, 40, 30))],  # all hard
               "000003": [("car", 1, 0, (1, 1, 8, 8)), ("bus", 0, 0, (17, 9, 40, 32))]}
    for stem, objs in objects.items():
        image = np.full((40, 48, 3), 40, np.uint8)
        for _, _, _, (x0, y0, x1, y1) in objs:
            image[y0 - 1 : y1, x0 - 1 : x1] = [230, 90, 30]
        Image.fromarray(image).save(root / "JPEGImages" / f"{stem}.jpg", quality=98)
        xml = "".join(VOC_OBJECT.format(name=n, t=t, d=d, x0=b[0], y0=b[1], x1=b[2], y1=b[3]) for n, t, d, b in objs)
        (root / "Annotations" / f"{stem}.xml").write_text(VOC_XML.format(stem=stem, objects=xml))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000003\n")
    return root


def test_voc_boxes_one_based_and_hard_objects(tmp_path):
    root = voc_fixture(tmp_path / "VOCdevkit" / "VOC2007")
    ds = BoxDataset.from_voc(root)
    assert [s.stem for s in ds.samples] == ["000001", "000002", "000003"]
    assert ds.load_target(ds.samples[0], (48, 40)).tolist() == [[4, 4, 20, 16]]
    assert len(ds.samples[2].boxes) == 2
    hard = BoxDataset.from_voc(root, drop_hard=True)
    assert [s.stem for s in hard.samples] == ["000001", "000003"] and hard.dropped == ["000002"]
    assert hard.samples[1].boxes == ((16, 8, 40, 32),)  # the truncated car is gone
    assert [s.stem for s in open_discovery("voc", tmp_path / "VOCdevkit", split="trainval").samples] == [
        "000001", "000003"]


def test_coco_boxes_are_xywh(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        Image.new("RGB", (48, 40)).save(tmp_path / "val2017" / name)
    payload = {"images": [{"id": 7, "file_name": "1.jpg"}, {"id": 8, "file_name": "2.jpg"},
                          {"id": 9, "file_name": "3.jpg"}],
               "annotations": [{"image_id": 7, "bbox": [3.5, 4, 10, 20], "iscrowd": 0},
                               {"image_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 0},
                               {"image_id": 9, "bbox": [1, 2, 3, 4], "iscrowd": 0}]}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(payload))
    ds = open_discovery("coco", tmp_path)
    assert [s.stem for s in ds.samples] == ["1", "3"] and [p.name for p in ds.missing] == ["2.jpg"]
    assert ds.load_target(ds.samples[0], (48, 40)).tolist() == [[3.5, 4, 13.5, 24], [0, 0, 5, 5]]
    assert ds.samples[1].boxes == ((1, 2, 4, 6),)


def test_cli_protocols_differ_and_corloc_on_voc(boxes_folder, tmp_path):
    register_source("toy")(lambda name: ColourBackbone())
    payloads = {}
    for protocol in ("tokencut", "soap"):
        out = tmp_path / f"{protocol}.json"
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "tokencut", "--model", "toy:colour", "--dataset", "folder", "--root", str(boxes_folder),
                  "--protocol", protocol, "--out", str(out)])
        assert exit_info.value.code == 0
        payloads[protocol] = json.loads(out.read_text())
    tc, soap = payloads["tokencut"], payloads["soap"]
    assert (tc["settings"]["protocol"], tc["settings"]["features"], tc["settings"]["tau"]) == ("tokencut", "keys", 0.2)
    assert (soap["settings"]["protocol"], soap["settings"]["features"], soap["settings"]["tau"]) == ("soap", "tokens", 0.3)
    assert tc["per_image"]["original"]["iou"] != soap["per_image"]["original"]["iou"]
    assert {"corloc", "maxFbeta"} <= set(tc["results"]["original"])
    voc = voc_fixture(tmp_path / "VOC2007")
    out = tmp_path / "voc.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "tokencut", "--model", "toy:colour", "--dataset", "voc", "--root", str(voc), "--drop-hard",
              "--out", str(out)])
    assert exit_info.value.code == 0
    payload = json.loads(out.read_text())
    res = payload["results"]["original"]
    assert set(res) == {"corloc", "n_images"} and res["n_images"] == 2
    saved = payload["per_image"]["original"]["corloc"]
    hits = [b is not None and max(plain_iou(b, g) for g in gts) >= 0.5
            for b, gts in zip(saved["box"], saved["gt_boxes"])]
    assert res["corloc"] == pytest.approx(100 * np.mean(hits))
