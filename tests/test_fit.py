"""End-to-end SOAP fit on a toy backbone, checked against an independent numpy recomputation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import ToyBackbone

from soapvit.data.transforms import ImageTransform
from soapvit.data.synthetic import SyntheticImages
from conftest import fit_soap
from soapvit.corrections import SoapConfig, SoapHead, attach


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(23):
        size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
        array = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"img{i:02d}.png")
    (folder / "zz_corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return folder


def _np_si(p, q):
    num = 2 * (p * q + (1 - p) * (1 - q))
    den = np.sqrt(p**2 + (1 - p) ** 2) + np.sqrt(q**2 + (1 - q) ** 2)
    return np.clip(num / den, 1e-6, 1 - 1e-6)


def _tokens(backbone, batches, block, norm=True):
    with torch.no_grad():
        return np.concatenate([backbone.forward_features(x, [block], norm=norm).tokens[block].double().numpy()
                               for x in batches])


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_fit_matches_numpy_recomputation(toy_backbone, image_folder, variant):
    backbone = toy_backbone
    head, report = fit_soap(backbone, image_folder, synthetic=17, batch_size=5, device="cpu", seed=3,
                       config=SoapConfig(variant=variant), blocks="all")
    assert report.n_real == 23 and report.n_synthetic == 17
    assert [Path(s["file"]).name for s in report.skipped] == ["zz_corrupt.jpg"]
    assert "zz_corrupt.jpg" in head.metadata["skipped"][0]["file"] and head.metadata["skipped"][0]["reason"]
    assert sorted(head.blocks) == [0, 1] and head.apply_block == 1

    transform = ImageTransform.for_backbone(backbone, size=16)
    from soapvit.data.images import list_images, load_image

    files = [f for f in list_images(image_folder) if f.suffix == ".png"]
    real_px = [torch.stack([transform(load_image(f)) for f in files])]
    fake_px = list(SyntheticImages(17, 16, "mixture", 3).batches(5))
    for block in (0, 1):
        # a fit gathers each block as a correction there edits it: block 0 is the raw residual
        # stream (no final norm), block 1 (the last) the final-norm output
        real = _tokens(backbone, real_px, block, norm=block == 1)  # (N, h, w, D)
        fake = _tokens(backbone, fake_px, block, norm=block == 1)
        flat = real.reshape(-1, real.shape[-1])
        mean = flat.mean(0)
        values, vectors = np.linalg.eigh(np.cov(flat, rowvar=False))
        values, vectors = values[::-1], vectors[:, ::-1]
        d = head.blocks[block]
        # float32 tokens: the batch scatter is float32, so eigenvalues agree to float32 precision
        np.testing.assert_allclose(d.eigenvalues.numpy(), values, rtol=1e-6, atol=1e-7 * values[0])
        # the final LayerNorm leaves one direction without variance (its response signs are rounding
        # noise); the raw residual stream of block 0 has none
        keep = values > 1e-9 * values[0]
        assert keep.sum() == len(values) - (block == 1)
        if variant == "reference":
            p = (((real - mean) @ vectors) > 0).mean(0)
            q = (((fake - mean) @ vectors) > 0).mean(0)
            si = np.where(keep, _np_si(p, q).mean((0, 1)), 1e-6)
            ranks = np.argsort(np.argsort(-si, kind="stable"), kind="stable")
            weights = si / (1 + np.exp(-(2 - 0.5 - ranks) / 0.05))
        else:
            p = ((real @ vectors) >= 0).mean((0, 1, 2))
            q = ((fake @ vectors) >= 0).mean((0, 1, 2))
            si = np.where(keep, _np_si(p, q), 1e-6)
            ranks = np.argsort(np.argsort(-si, kind="stable"), kind="stable") + 1
            sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
            weights = si * sig((2 - ranks) / 0.05) / sig(2 / 0.05)
        np.testing.assert_allclose(d.si.numpy()[keep], si[keep], rtol=1e-9)
        # the null direction carries nothing to remove: its SI is pinned to the floor (never ranked)
        np.testing.assert_array_equal(d.si.numpy()[~keep], 1e-6)
        np.testing.assert_allclose(d.weights.numpy(), weights, rtol=1e-9, atol=1e-12)
        assert weights[keep].max() > 0.25  # something is removed: the check is not vacuous
        share = ((real.mean(0).reshape(-1, len(mean)) - mean) @ vectors) ** 2
        np.testing.assert_allclose(d.position_share.numpy()[keep], np.clip(share.mean(0) / values, 0, 1)[keep], rtol=1e-5)
        proj = np.eye(len(si)) - vectors @ np.diag(weights) @ vectors.T
        if block == 1:
            np.testing.assert_allclose(head.projector.double().numpy(), proj, atol=1e-6)


def test_fit_without_cache_gives_the_same_head(toy_backbone, image_folder):
    backbone = toy_backbone
    cached, r1 = fit_soap(backbone, image_folder, synthetic=8, batch_size=4, device="cpu", blocks="last")
    uncached, r2 = fit_soap(backbone, image_folder, synthetic=8, batch_size=4, device="cpu", blocks="last", cache_gb=0)
    assert r1.cached and not r2.cached
    torch.testing.assert_close(cached.blocks[1].si, uncached.blocks[1].si)
    torch.testing.assert_close(cached.projector, uncached.projector)


def test_soap_finds_the_position_embedding_and_attach_removes_it(image_folder, tmp_path):
    """The toy backbone adds a large fixed position embedding: the highest-SI components must
    lie in its span, and the attached head must shrink it."""
    backbone = ToyBackbone(pos_scale=4.0)
    head, _ = fit_soap(backbone, image_folder, synthetic=23, batch_size=8, device="cpu", blocks="last",
                  config=SoapConfig(weighting="reference", mu=2))
    d = head.blocks[1]
    top = torch.argsort(d.si, descending=True)[:2]
    assert d.si[top].min() > 0.75
    # responses of position-coding components are (nearly) the same map for real and synthetic
    assert (d.p_real[..., top] - d.q_synthetic[..., top]).abs().mean() < 0.15
    # and they are position codes: most of their variance is explained by patch position
    assert d.position_share[top].min() > 0.5

    head = SoapHead.load(head.save(tmp_path / "head.safetensors"))
    wrapped = attach(backbone, head)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        plain = backbone.forward_features(x, "all")
        corrected = wrapped.forward_features(x, "all")
    torch.testing.assert_close(corrected.tokens[0], plain.tokens[0])
    torch.testing.assert_close(corrected.tokens[1], head.transform(plain.tokens[1]))
    torch.testing.assert_close(corrected.prefix[1], plain.prefix[1])


def test_methods_all_leaves_out_what_does_not_apply_and_a_named_method_must_apply(image_folder, tmp_path):
    from soapvit.corrections import METHODS, CorrectionSet
    from soapvit.errors import SoapvitError
    from soapvit.fitting import fit

    backbone = ToyBackbone()  # no MLP activations: test-time registers cannot be calibrated
    corrections, report = fit(backbone, image_folder, synthetic=6, batch_size=8, device="cpu", methods="all")
    assert list(corrections) == [m for m in METHODS if m != "registers"]
    assert any("registers left out" in w for w in report.warnings)
    loaded = CorrectionSet.load(corrections.save(tmp_path / "all.safetensors"))
    assert list(loaded) == list(corrections) and loaded.metadata["methods"] == list(corrections)
    with pytest.raises(SoapvitError, match="MLP activations"):
        fit(backbone, image_folder, synthetic=6, batch_size=8, device="cpu", methods="soap,registers")


def test_fit_takes_a_generator_of_paths_and_refuses_what_is_no_image_collection(image_folder):
    from soapvit.errors import SoapvitError
    from soapvit.fitting import resolve_images

    paths = sorted(p for p in image_folder.iterdir() if p.suffix == ".png")
    source = resolve_images((p for p in paths), limit=4)
    assert [source.name(i) for i in range(len(source))] == [str(p) for p in paths[:4]]
    with pytest.raises(SoapvitError, match="not int"):
        resolve_images(3)
