"""TokenCut over a saliency folder: defects handled, JSON metrics equal a recomputation from the
saved masks, SOAP from the same pass, the CLI end to end."""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import ColourBackbone
from eval_helpers import make_head, saliency_folder
from PIL import Image

from soapvit.backbones.registry import register_source
from soapvit.cli import main
from soapvit.data.images import DataFolderError
from soapvit.data.saliency import SaliencyDataset, load_mask
from soapvit.eval.salient import TokenCutConfig, evaluate_tokencut


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saliency_folder(tmp_path_factory.mktemp("ecssd"))


def recompute(pred_dir, mask_dir, stems):
    """Independent TokenCut metrics from PNG files: thresholds k/255 on the 8-bit maps."""
    ious, accs, fs = [], [], []
    for stem in stems:
        pred = np.asarray(Image.open(pred_dir / f"{stem}.png")).astype(float) / 255
        gt_img = Image.open(mask_dir / f"{stem}.png")
        if gt_img.size != pred.shape[::-1]:
            gt_img = gt_img.resize(pred.shape[::-1], Image.Resampling.NEAREST)
        gt = np.asarray(gt_img) > 0
        p = pred > 0.5
        ious.append((p & gt).sum() / (p | gt).sum())
        accs.append((p == gt).mean())
        row = []
        for k in range(255):
            m = pred > k / 255 + 1e-9
            tp = (m & gt).sum()
            prec = tp / m.sum() if m.sum() else 1.0
            rec = tp / gt.sum()
            row.append(1.3 * prec * rec / (0.3 * prec + rec) if prec + rec else 0.0)
        fs.append(row)
    return 100 * np.mean(np.mean(fs, 0).max()), 100 * np.mean(ious), 100 * np.mean(accs)


def test_dataset_pairs_by_stem_and_reports_missing(folder):
    ds = SaliencyDataset.from_folders(folder / "images")  # masks/ found as a sibling
    stems = [s.stem for s in ds.samples]
    assert "nomask" not in stems and "broken" in stems
    assert [p.name for p in ds.missing] == ["nomask.png"]


def test_mask_of_another_size_is_resized_with_a_warning(folder):
    with pytest.warns(UserWarning, match="0003.png is .* resized"):
        mask = load_mask(folder / "masks" / "0003.png", size=(10, 7))
    assert mask.shape == (7, 10) and mask.dtype == bool


def test_no_mask_folder_is_a_clear_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(DataFolderError, match="--masks"):
        SaliencyDataset.from_folders(tmp_path / "imgs")


@pytest.mark.parametrize("bilateral", [False, True])
def test_metrics_equal_recomputation_from_saved_masks(colour_backbone, folder, tmp_path, bilateral):
    backbone = colour_backbone
    ds = SaliencyDataset.from_folders(folder / "images", folder / "masks")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every problem must be reported, not warned mid-run
        report = evaluate_tokencut(backbone, ds, config=TokenCutConfig(tau=0.2, bilateral=bilateral, batch_size=3),
                                   save_masks=tmp_path)
    stems = sorted(p.stem for p in tmp_path.glob("*.png"))
    assert stems == ["0000", "0001", "0002", "0003", "0004", "0005", "0006"]
    assert any("broken.jpg" in s for s in report.log.lines()) and any("nomask.png" in s for s in report.log.lines())
    assert any("0003.png" in w and "resized" in w for w in report.warnings)
    res = report.results["original"]
    assert res["n_images"] == 7
    f, iou, acc = recompute(tmp_path, folder / "masks", stems)
    assert res["maxFbeta"] == pytest.approx(f, abs=1e-6)
    assert res["iou"] == pytest.approx(iou, abs=1e-6)
    assert res["acc"] == pytest.approx(acc, abs=1e-6)
    assert res["iou"] > 50  # the colour toy separates its rectangles
    if bilateral:
        assert set(report.results) == {"original", "original/raw"}
        saved = np.asarray(Image.open(tmp_path / "0000.png"))
        assert len(np.unique(saved)) > 2  # the solver's soft output is what is scored and saved


def test_soap_head_shares_the_pass_and_identity_head_changes_nothing(colour_backbone, folder, tmp_path):
    backbone = colour_backbone
    ds = SaliencyDataset.from_folders(folder / "images", folder / "masks")
    identity = make_head(torch.eye(12))
    report = evaluate_tokencut(backbone, ds, corrections={"soap": identity}, config=TokenCutConfig(tau=0.2),
                               save_masks=tmp_path)
    assert report.results["soap"] == report.results["original"]
    for p in tmp_path.glob("*.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "soap" / p.name)))
    # a head that removes most dimensions changes the result, and keys are reported original only
    lossy = make_head(torch.diag(torch.tensor([1.0] * 2 + [0.0] * 10)))
    changed = evaluate_tokencut(backbone, ds, corrections={"soap": lossy}, config=TokenCutConfig(tau=0.2))
    assert changed.results["soap"] != changed.results["original"]
    keys = evaluate_tokencut(backbone, ds, corrections={"soap": lossy}, config=TokenCutConfig(features="keys"))
    assert set(keys.results) == {"original"} and any("keys" in w for w in keys.warnings)


def test_cli_tokencut_json_and_figure(folder, tmp_path, capsys):
    register_source("toy")(lambda name: ColourBackbone())
    head_file = make_head(torch.diag(torch.tensor([1.0] * 6 + [0.0] * 6))).save(tmp_path / "head.safetensors")
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "tokencut", "--model", "toy:colour", "--images", str(folder / "images"), "--masks",
              str(folder / "masks"), "--head", str(head_file), "--tau", "0.2", "--out", str(out), "--save-masks",
              str(tmp_path / "m")])
    assert exit_info.value.code == 0
    payload = json.loads(out.read_text())
    assert payload["kind"] == "tokencut" and set(payload["results"]) == {"original", "soap"}
    assert {"maxFbeta", "iou", "acc", "n_images"} <= set(payload["results"]["original"])
    assert payload["results"]["original"]["n_images"] == 7 and {"skipped", "warnings", "settings"} <= set(payload)
    assert not {"private_fields", "examples"} & set(payload)  # class settings and figures stay out of the JSON
    assert (tmp_path / "r_masks.png").is_file()
    f, iou, acc = recompute(tmp_path / "m" / "soap", folder / "masks", [f"{i:04d}" for i in range(7)])
    assert payload["results"]["soap"]["iou"] == pytest.approx(iou, abs=1e-6)
    printed = capsys.readouterr().out
    assert "Δ to original" in printed and "same pass" in printed and "ΔmaxFβ" in printed
    ci = payload["intervals"]["soap"]["iou"]
    assert ci["low"] <= ci["delta"] <= ci["high"]
    assert ci["delta"] == pytest.approx(payload["results"]["soap"]["iou"] - payload["results"]["original"]["iou"])


def test_cli_missing_masks_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "tokencut", "--model", "toy:colour", "--images", str(tmp_path / "imgs")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--masks" in err and "Traceback" not in err


def test_resize_modes_follow_tokencut_and_fixed_size():
    backbone = ColourBackbone(patch=14)
    aspect = TokenCutConfig().image_transform(backbone)
    assert aspect.resample == "lanczos"
    assert aspect.output_size(400, 300) == (406, 294)  # round(400/14)=29, round(300/14)=21 patches
    assert TokenCutConfig(resize="square", image_size=224).image_transform(backbone).output_size(400, 300) == (224, 224)
    assert TokenCutConfig(features="keys").tau == 0.2 and TokenCutConfig().tau == 0.3
