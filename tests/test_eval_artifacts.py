"""Artifacts as numbers: each measure against a brute-force numpy recomputation, and the whole pass
on a toy backbone with a planted position embedding before and after posmean."""

import json

import numpy as np
import pytest
import torch
from conftest import ToyBackbone, write_noise_images

from soapvit.data.sources import ImageFiles
from soapvit.eval.artifacts import effective_rank, measure_artifacts, position_probe_accuracy, token_artifacts
from soapvit.fitting import fit


def test_cosines_norm_share_and_rank_equal_brute_force():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((5, 2, 3, 4)) + np.array([3.0, 0, 0, 0])
    tokens[1, 0, 2] *= 40  # one outlier
    got = token_artifacts(torch.from_numpy(tokens), threshold=20.0)
    unit = tokens.reshape(5, 6, 4) / np.linalg.norm(tokens.reshape(5, 6, 4), axis=-1, keepdims=True)
    same, other = [], []
    for i in range(5):
        for j in range(5):
            if i == j:
                continue
            for p in range(6):
                for q in range(6):
                    (same if p == q else other).append(unit[i, p] @ unit[j, q])
    assert got["cos_same_position"] == pytest.approx(np.mean(same))
    assert got["cos_other_position"] == pytest.approx(np.mean(other))
    assert got["high_norm_share"] == pytest.approx(1 / 30)
    lam = np.linalg.eigvalsh(np.cov(tokens.reshape(-1, 4), rowvar=False))
    p = lam / lam.sum()
    assert got["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0])) == pytest.approx(3.0)


def test_position_probe_finds_planted_positions_and_is_at_chance_without_them():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(40, 9, 16, generator=g)
    codes = torch.randn(9, 16, generator=g) * 3
    assert position_probe_accuracy((noise + codes)[:20], (noise + codes)[20:]) > 0.95
    assert position_probe_accuracy(noise[:20], noise[20:]) < 0.3  # chance is 1/9


def test_posmean_removes_the_planted_position_signal(tmp_path):
    backbone = ToyBackbone(pos_scale=4.0)
    images = write_noise_images(tmp_path / "imgs", n=12)
    corrections, _ = fit(backbone, images, synthetic=6, device="cpu", blocks="last", methods="soap,posmean,top-pc")
    source = ImageFiles(sorted(images.glob("*.png")))
    report = measure_artifacts(backbone, source, corrections=corrections, batch_size=5)
    original, posmean = report.results["original"], report.results["posmean"]
    assert list(report.results) == ["original", "soap", "posmean", "top-pc"]
    assert original["position_probe_acc"] > 0.9
    assert original["cos_same_position"] > original["cos_other_position"] + 0.2
    # subtracting the per-position mean leaves no position-dependent mean, so the gap closes
    assert posmean["cos_same_position"] - posmean["cos_other_position"] < 0.2 * (
        original["cos_same_position"] - original["cos_other_position"])
    assert json.loads(json.dumps(report.to_dict()))["kind"] == "artifacts"


def test_cli_artifacts_writes_every_variant(run_cli, tmp_path):
    images = write_noise_images(tmp_path / "imgs", n=8)
    head = tmp_path / "h.safetensors"
    code, _, err = run_cli(["fit", "--model", "zoo:mae", "--images", str(images), "--synthetic", "4",
                            "--blocks", "last", "--methods", "soap,posmean,high-norm", "--out", str(head)])
    assert code in (0, None), err
    out = tmp_path / "a.json"
    code, printed, err = run_cli(["eval", "artifacts", "--model", "zoo:mae", "--images", str(images), "--head",
                                  str(head), "--out", str(out)])
    assert code in (0, None), err
    payload = json.loads(out.read_text())
    assert list(payload["results"]) == ["original", "soap", "posmean", "high-norm"]
    assert "probe chance" in printed and "high-norm" in printed
