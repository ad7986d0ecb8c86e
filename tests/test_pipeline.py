"""The token pipeline: one path from any source to tokens, skipped items logged, and the head rule
(last block: transform the output; earlier block: propagate through the later blocks), checked
against a hand-written block-by-block forward in probes, TokenCut and kNN segmentation."""

import numpy as np
import pytest
import torch
from conftest import write_noise_images
from eval_helpers import make_head, saliency_folder
from PIL import Image
from test_eval_knnseg import seg_folder
from torch import nn

from soapvit.aggregate.cache import encode_images
from soapvit.backbones.base import Backbone, RawOutput
from soapvit.data.labelled import LabelledImages
from soapvit.data.saliency import SaliencyDataset
from soapvit.data.segmentation import SegmentationSplit
from soapvit.data.sources import ImageFiles
from soapvit.data.transforms import ImageTransform
from soapvit.eval.knnseg import KnnConfig, evaluate_knnseg
from soapvit.eval.salient import TokenCutConfig, evaluate_tokencut
from soapvit.features import iter_tokens, plan_batches
from soapvit.runlog import RunLog


class ThreeBlocks(Backbone):
    """Any grid; every block mixes channels and tokens, so an edit at block 0 reaches block 2.
    ``manual_projector`` hard-codes a projection of the patch tokens after ``manual_block``."""

    def __init__(self, manual_projector=None, manual_block=0):
        super().__init__("toy:colour", patch_size=4, embed_dim=12, num_blocks=3, num_heads=1, num_prefix_tokens=1,
                         image_size=16)
        g = torch.Generator().manual_seed(0)
        self.colour = nn.Parameter(torch.randn(3, 12, generator=g))
        self.mix = nn.ParameterList([nn.Parameter(torch.randn(12, 12, generator=g) / 12**0.5) for _ in range(3)])
        self.norm = nn.LayerNorm(12)
        self.manual_projector, self.manual_block = manual_projector, manual_block

    def _run(self, pixels, blocks, norm, keys, attentions, edits):
        x = torch.tanh(nn.functional.avg_pool2d(pixels, 4).flatten(2).transpose(1, 2) @ self.colour)
        x = torch.cat([x.mean(1, keepdim=True), x], 1)
        hidden = {}
        for i, w in enumerate(self.mix):
            x = x + torch.tanh(x @ w) + 0.3 * x.mean(1, keepdim=True)
            if self.manual_projector is not None and i == self.manual_block:
                x = torch.cat([x[:, :1], x[:, 1:] @ self.manual_projector], 1)
            if i in edits:
                x = edits[i](x)
            if i in blocks:
                hidden[i] = self.norm(x) if i in norm else x
        return RawOutput(hidden=hidden, keys=x @ self.mix[-1] if keys else None)


PROJECTOR = torch.diag(torch.tensor([1.0] * 8 + [0.0] * 4))


def test_an_earlier_head_propagates_and_equals_the_manual_forward():
    backbone, manual = ThreeBlocks(), ThreeBlocks(PROJECTOR, 0)
    head = make_head(PROJECTOR, apply_block=0)
    source = LabelledImages(torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8), torch.zeros(5), {"toy": 1})
    transform = ImageTransform.for_backbone(backbone, 16)
    batch = next(iter_tokens(backbone, source, transform, blocks="all", corrections={"soap": head}, batch_size=8))
    expected = next(iter_tokens(manual, source, transform, blocks="all", batch_size=8)).original
    for b in range(3):
        torch.testing.assert_close(batch.variants["soap"].tokens[b], expected.tokens[b])
    assert not torch.allclose(batch.variants["soap"].tokens[2], batch.original.tokens[2], atol=1e-3)
    # a head at the last block: only the output changes, by the projector
    last = make_head(PROJECTOR, apply_block=2)
    out = next(iter_tokens(backbone, source, transform, blocks="all", corrections={"soap": last}, batch_size=8))
    torch.testing.assert_close(out.variants["soap"].tokens[1], out.original.tokens[1])
    torch.testing.assert_close(out.variants["soap"].tokens[2], out.original.tokens[2] @ PROJECTOR)
    # the probe cache: the SOAP tokens of an earlier head are the manual forward's tokens
    caches = encode_images(backbone, source, image_size=16, corrections={"soap": head})
    plain = encode_images(manual, source, image_size=16)["original"]
    torch.testing.assert_close(caches["soap"].patches, plain.patches)


def test_tokencut_and_knn_with_an_earlier_head_equal_the_manual_forward(tmp_path):
    backbone, manual = ThreeBlocks(), ThreeBlocks(PROJECTOR, 0)
    head = make_head(PROJECTOR, apply_block=0)
    dataset = SaliencyDataset.from_folders(saliency_folder(tmp_path / "sal", n=5) / "images")
    config = TokenCutConfig(tau=0.2, batch_size=2)
    with_head = evaluate_tokencut(backbone, dataset, corrections={"soap": head}, config=config)
    by_hand = evaluate_tokencut(manual, dataset, config=config)
    assert with_head.results["soap"] == by_hand.results["original"]
    assert with_head.results["soap"] != with_head.results["original"]
    train = SegmentationSplit.open(seg_folder(tmp_path / "seg" / "train", 4, 0))
    val = SegmentationSplit.open(seg_folder(tmp_path / "seg" / "val", 3, 1))
    knn = KnnConfig(k=5, image_size=16)
    with_head = evaluate_knnseg(backbone, train, val, corrections={"soap": head}, config=knn)
    by_hand = evaluate_knnseg(manual, train, val, config=knn)
    assert with_head.results["soap"]["miou"] == pytest.approx(by_hand.results["original"]["miou"], abs=1e-9)


def test_bad_files_are_logged_once_with_reasons_and_batches_group_by_size(tmp_path):
    good = []
    for i, size in enumerate([(20, 12), (12, 20), (20, 12), (16, 16)]):
        good.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(good[-1])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    files = [good[0], broken, good[1], good[2], empty, good[3]]
    backbone = ThreeBlocks()
    transform = ImageTransform.for_backbone(backbone, mode="aspect")
    log = RunLog()
    plan = plan_batches(ImageFiles(files), transform, range(len(files)), 8, log)
    assert sorted(map(sorted, plan)) == [[0, 3], [2], [5]]  # same model-input size together
    assert [e["file"] for e in log.skipped] == [str(broken), str(empty)]
    log = RunLog()
    seen = []
    for batch in iter_tokens(backbone, ImageFiles(files), transform, batch_size=8, log=log):
        seen += batch.indices
        assert tuple(batch.original.tokens[2].shape[1:3]) == tuple(d // 4 for d in batch.pixels.shape[-2:])
    assert sorted(seen) == [0, 2, 3, 5]
    assert len(log.skipped) == 2 and all(e["reason"] for e in log.skipped)


def test_pixels_from_pil_and_uint8_tensors_agree():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    transform = ImageTransform(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), patch_size=4, size=24)
    from_pil = transform(Image.fromarray(array))
    from_tensor = transform(torch.from_numpy(array).permute(2, 0, 1))
    expected = (array / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.3])
    np.testing.assert_allclose(from_pil.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    torch.testing.assert_close(from_tensor, from_pil)


def test_branch_features_are_the_mlp_branch_of_each_block():
    from soapvit.backbones.vit import ViTConfig, VisionTransformerBackbone

    torch.manual_seed(0)
    backbone = VisionTransformerBackbone(ViTConfig(image_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2))
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        branch = backbone.forward_features(pixels, "all", block_features="branch")
        vit = backbone.vit
        x = torch.cat([vit.prefix(2), vit.embed_patches(pixels)], 1)
        for b, block in enumerate(vit.blocks):
            mid = x + block.attn(block.norm1(x))[0]
            expected = block.mlp(block.norm2(mid))
            torch.testing.assert_close(branch.tokens[b], expected[:, 1:].reshape(2, 4, 4, 16))
            torch.testing.assert_close(branch.prefix[b], expected[:, :1])
            x = mid + expected
    with pytest.raises(Exception, match="block-features"):
        backbone.forward_features(pixels, block_features="mlp")


def test_posmean_subtracts_the_measured_offset_and_is_scored(tmp_path):
    from soapvit.corrections import CorrectionSet
    from soapvit.fitting import fit

    images = write_noise_images(tmp_path / "imgs", size=(20, 16))
    backbone = ThreeBlocks()
    fitted, _ = fit(backbone, images, synthetic=6, device="cpu", blocks="all", image_size=16, methods="soap,posmean")
    corrections = CorrectionSet.load(fitted.save(tmp_path / "c.safetensors"))
    assert list(corrections) == ["soap", "posmean"]
    d = corrections.soap.blocks[2]
    batch = next(iter_tokens(backbone, ImageFiles(sorted(images.glob("*.png"))), ImageTransform.for_backbone(
        backbone, 16), blocks="all", corrections=corrections))
    offset = (d.position_mean - d.mean).float()  # (4, 4, D): the fit's grid
    torch.testing.assert_close(batch.variants["posmean"].tokens[2], batch.original.tokens[2] - offset)
    torch.testing.assert_close(batch.variants["posmean"].tokens[1], batch.original.tokens[1])  # its block only
    # on the fit's own images the baseline leaves every position with the same mean token
    means = batch.variants["posmean"].tokens[2].double().mean(0)
    torch.testing.assert_close(means, means.mean((0, 1)).expand_as(means), atol=1e-5, rtol=0)
    # a SOAP-only file derives posmean from the SOAP decomposition
    soap_only = CorrectionSet.load(corrections.soap.save(tmp_path / "soap.safetensors"))
    assert list(soap_only) == ["soap", "posmean"]
    torch.testing.assert_close(soap_only["posmean"].offset_, corrections["posmean"].offset_)
    dataset = SaliencyDataset.from_folders(saliency_folder(tmp_path / "sal", n=4) / "images")
    report = evaluate_tokencut(backbone, dataset, corrections=corrections, config=TokenCutConfig(tau=0.2))
    assert list(report.results) == ["original", "soap", "posmean"]
    assert set(report.intervals) == {"soap", "posmean"} and report.passes["posmean"] == "same pass"


def test_an_earlier_head_propagates_through_an_hf_dinov2(tmp_path):
    """The same rule on a real model class: a tiny transformers ``Dinov2Model`` loaded through the
    ``hf:`` adapter, a head at block 0 of 3, against the model's own layers run by hand with the
    projector applied to the patch tokens after layer 0."""
    transformers = pytest.importorskip("transformers")
    from soapvit.backbones import load

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=24, num_hidden_layers=3, num_attention_heads=3, mlp_ratio=2,
                                       image_size=32, patch_size=8)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "tiny")
    backbone = load(f"hf:{tmp_path / 'tiny'}")
    model = transformers.Dinov2Model.from_pretrained(tmp_path / "tiny").eval()
    projector = torch.diag(torch.tensor([1.0] * 16 + [0.0] * 8))
    head = make_head(projector, apply_block=0)
    head.metadata["backbone"] = backbone.model_id
    pixels = torch.randn(3, 3, 32, 40)
    source = LabelledImages(torch.randint(0, 256, (3, 3, 32, 40), dtype=torch.uint8), torch.zeros(3), {"toy": 1})
    with torch.no_grad():
        x = model.embeddings(pixels)
        manual = {}
        for i, layer in enumerate(model.encoder.layer):
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x
            if i == 0:
                x = torch.cat([x[:, :1], x[:, 1:] @ projector], 1)
            manual[i] = model.layernorm(x)[:, 1:].reshape(3, 4, 5, 24)
        plain = model(pixel_values=pixels).last_hidden_state[:, 1:].reshape(3, 4, 5, 24)
        from soapvit.corrections import attach

        corrected = attach(backbone, head).forward_features(pixels, "all")
    for b in range(3):
        torch.testing.assert_close(corrected.tokens[b], manual[b], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(corrected.tokens[2], plain, atol=1e-3)  # the edit reached the later blocks
    # and through the token pipeline (what fit, TokenCut and kNN read)
    transform = ImageTransform.for_backbone(backbone, 32)
    batch = next(iter_tokens(backbone, source, transform, blocks="all", corrections={"soap": head}, batch_size=8))
    with torch.no_grad():
        ref = attach(backbone, head).forward_features(batch.pixels, "all")
    torch.testing.assert_close(batch.variants["soap"].tokens[2], ref.tokens[2])
    assert not torch.allclose(batch.variants["soap"].tokens[2], batch.original.tokens[2], atol=1e-3)
