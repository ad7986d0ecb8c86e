"""Linear segmentation probe: learns a colour → class segmentation from colour tokens, the loss
falls, every variant is trained and scored, from Python and the CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import ColourBackbone
from eval_helpers import make_head
from test_eval_knnseg import seg_folder

from soapvit.backbones.registry import register_source
from soapvit.cli import main
from soapvit.data.segmentation import SegmentationSplit
from soapvit.errors import SoapvitError
from soapvit.eval.linear_seg import LinearSegConfig, evaluate_linear_seg, loss_curve, poly_lr, train_probe


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    base = tmp_path_factory.mktemp("linseg")
    return seg_folder(base / "train", 8, 0), seg_folder(base / "val", 4, 1)


def test_poly_schedule_and_loss_curve():
    assert poly_lr(0, 100, 0.9) == 1.0 and poly_lr(50, 100, 1.0) == 0.5
    assert poly_lr(99, 100, 0.9) == pytest.approx(0.01**0.9)
    assert loss_curve([4.0, 2.0, 1.0, 1.0], 2) == [3.0, 1.0]


def test_probe_fits_a_separable_token_map():
    """Two classes decided by the sign of token dimension 0: the probe reaches every pixel, the
    ignore index is skipped (a label it never sees cannot stop training)."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(12, 3, 3, 5, generator=g)
    features[..., 0] += features[..., 0].sign()  # a margin around 0
    labels = (features[..., 0] > 0).long().repeat_interleave(4, 1).repeat_interleave(4, 2)  # (12, 12, 12)
    labels[:, 0] = 255
    labels[:8][labels[:8] == 0] = 255  # class 0 labelled in 4 images only: counted as a class, it would be lost
    head, losses = train_probe(features.half(), labels, 2, 255, LinearSegConfig(iterations=300, batch_size=4, lr=0.03))
    with torch.no_grad():
        logits = head(features.permute(0, 3, 1, 2)).argmax(1)
    assert (logits == (features[..., 0] > 0).long()).float().mean() == 1.0
    assert not head.training  # BatchNorm uses its running statistics from here on
    assert losses[-1] < 0.5 * losses[0]


def test_linear_probe_learns_colour_classes_for_every_variant(colour_backbone, splits):
    train, val = SegmentationSplit.open(splits[0]), SegmentationSplit.open(splits[1], what="--val")
    projector = torch.eye(12)
    projector[:6, :6] = 0
    corrections = {"soap": make_head(projector), "blank": make_head(torch.zeros(12, 12))}  # blank: every token 0
    report = evaluate_linear_seg(colour_backbone, train, val, corrections=corrections,
                                 config=LinearSegConfig(iterations=300, batch_size=4, image_size=32))
    assert set(report.results) == {"original", "soap", "blank"} and set(report.intervals) == {"soap", "blank"}
    assert report.results["blank"]["miou"] < 40  # its own probe on its own (constant) tokens: one class
    assert report.intervals["blank"]["miou"]["high"] < -40
    for variant in ("original", "soap"):
        result = report.results[variant]
        assert result["miou"] > 85 and result["acc"] > 90
        curve = report.loss[variant]
        assert len(curve) == 20 and curve[-1] < 0.6 * curve[0]
        assert result["final_loss"] == curve[-1]
    # scored at the label maps' own size (40x28 with the void top row left out)
    counts = np.array(report.per_image["original"]["tp_fp_fn"])
    assert (counts[:, :, 0].sum(1) + counts[:, :, 2].sum(1)).tolist() == [40 * 27] * 4
    assert report.results["soap"] != report.results["original"]
    assert report.settings["n_train"] == 8 and report.settings["input"] == [32, 32]
    with pytest.raises(SoapvitError, match="iterations"):
        LinearSegConfig(iterations=0)


def test_cli_linseg(splits, tmp_path):
    register_source("toy")(lambda name: ColourBackbone())
    out = tmp_path / "l.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "linseg", "--model", "toy:colour", "--train", str(splits[0]), "--val", str(splits[1]),
              "--iterations", "200", "--batch-size", "4", "--image-size", "32", "--out", str(out)])
    assert exit_info.value.code == 0
    payload = json.loads(out.read_text())
    assert payload["kind"] == "linseg" and payload["settings"]["iterations"] == 200
    assert payload["results"]["original"]["miou"] > 80
    assert len(payload["per_image"]["original"]["index"]) == 4
