"""Warp consistency: warps move content where their map says, hand-computed PCK and same-position
rates, pooled intervals against a numpy recomputation, planted positional tokens removed by posmean."""

import json

import numpy as np
import pytest
import torch
from conftest import ToyBackbone
from PIL import Image

from soapvit.backbones.registry import register_source
from soapvit.cli import main
from soapvit.data.sources import open_images
from soapvit.eval.correspondence import WARPS, Warp, WarpConfig, WarpMetrics, evaluate_warp, make_warp, match_scores


@pytest.mark.parametrize("kind", WARPS)
def test_warp_moves_content_to_its_mapped_position(kind):
    side = 64
    image = np.zeros((side, side, 3), np.uint8)
    image[22:26, 26:30] = 255  # a bright square centred at (28, 24)
    for seed in range(20):  # a warp that keeps the square well inside the view
        warp = make_warp(kind, side, np.random.default_rng(seed))
        expected = warp.map(np.array([28.0, 24.0]))
        if np.all((expected > 6) & (expected < side - 6)):
            break
    out = np.asarray(warp.apply(Image.fromarray(image))).astype(float).sum(-1)
    ys, xs = np.nonzero(out > 0.3 * out.max())
    weights = out[ys, xs]
    centroid = np.array([(xs + 0.5) @ weights, (ys + 0.5) @ weights]) / weights.sum()
    np.testing.assert_allclose(centroid, expected, atol=1.0)


def test_match_scores_by_hand():
    side, g = 16, 4
    content = torch.eye(g * g).reshape(g, g, g * g)  # a unique token per cell
    flip = Warp("flip", -1.0, 16.0, 1.0, 0.0)
    follows_content = match_scores(content, content.flip(1), flip, side)  # B holds A's content mirrored
    assert follows_content == {"valid": 16, "moved": 16, "same": 0, "pck@0.05": 16, "pck@0.1": 16}
    follows_position = match_scores(content, content, flip, side)  # B's tokens are the positions only
    assert follows_position == {"valid": 16, "moved": 16, "same": 16, "pck@0.05": 0, "pck@0.1": 0}
    # a shift by 6 px: 8 of 16 patch centres stay inside; centre 2+6=8 sits on a cell boundary → cell 2
    shift = Warp("shift", 1.0, 6.0, 1.0, 0.0)
    counts = match_scores(content, content, shift, side)
    assert counts["valid"] == 8 and counts["moved"] == 8 and counts["same"] == 8
    assert counts["pck@0.1"] == 0  # matched 6 px away from the target, more than 1.6 px
    pooled = WarpMetrics({0: {"valid": 10, "moved": 4, "same": 3, "pck@0.05": 2, "pck@0.1": 5},
                          3: {"valid": 6, "moved": 6, "same": 1, "pck@0.05": 0, "pck@0.1": 3}}).result()
    assert pooled["same_position"] == pytest.approx(100 * 4 / 10)  # of the moved patches only
    assert pooled["pck@0.05"] == pytest.approx(100 * 2 / 16) and pooled["pck@0.1"] == pytest.approx(50)


@pytest.fixture(scope="module")
def noise_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for i in range(8):
        cells = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)  # one colour per patch: unique content
        Image.fromarray(np.kron(cells, np.ones((4, 4, 1), np.uint8))).save(folder / f"{i}.png")
    return folder


def test_posmean_lowers_the_same_position_rate_of_planted_positions(noise_images):
    from soapvit.fitting import fit

    backbone = ToyBackbone(pos_scale=3.0).eval()
    fitted, _ = fit(backbone, noise_images, synthetic=6, device="cpu", blocks="last", image_size=16,
                    methods="soap,posmean")
    report = evaluate_warp(backbone, open_images(noise_images), corrections={"posmean": fitted["posmean"]},
                           config=WarpConfig(warps=("flip", "shift"), batch_size=3))
    orig, pm = report.results["original"], report.results["posmean"]
    assert orig["n_images"] == pm["n_images"] == 8
    assert orig["same_position"] > 50  # the planted position embedding wins the match
    assert pm["same_position"] < orig["same_position"] - 20
    assert pm["pck@0.1"] > orig["pck@0.1"]
    # pooled figures and the paired interval recomputed from the per-image counts
    for name, res in report.results.items():
        counts = report.per_image[name]["counts"]
        total = {k: sum(c[k] for c in counts) for k in counts[0]}
        assert res["same_position"] == pytest.approx(100 * total["same"] / total["moved"])
        assert res["pck@0.05"] == pytest.approx(100 * total["pck@0.05"] / total["valid"])
    ci = report.intervals["posmean"]["same_position"]
    assert ci["delta"] == pytest.approx(pm["same_position"] - orig["same_position"])
    assert ci["low"] <= ci["delta"] <= ci["high"] and ci["high"] < 0
    assert report.passes == {"original": "same pass", "posmean": "same pass"}


def test_cli_warp_writes_every_variant(noise_images, tmp_path):
    register_source("toy")(lambda name: ToyBackbone())
    out = tmp_path / "w.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "warp", "--model", "toy:test", "--images", str(noise_images), "--warps", "flip,crop",
              "--out", str(out)])
    assert exit_info.value.code == 0
    payload = json.loads(out.read_text())
    assert payload["kind"] == "warp" and {"pck@0.05", "pck@0.1", "same_position"} <= set(payload["results"]["original"])
    assert payload["settings"]["warps"] == ["flip", "crop"]
