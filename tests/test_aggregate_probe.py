"""Probe pipeline: data arguments, feature cache, SOAP on cached tokens, training, CLI."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from conftest import write_noise_images
from conftest import ToyBackbone

from soapvit.aggregate import AbMILPConfig, ProbeConfig, run_probe
from soapvit.aggregate.attention import attention_profile, cls_attention_statistics
from soapvit.aggregate.cache import TokenCache, corrected, encode_images
from soapvit.aggregate.heads import ProbeClassifier, make_pool
from soapvit.aggregate.train import train_probe
from soapvit.backbones.registry import register_source
from soapvit.backbones.vit import ViTConfig, VisionTransformerBackbone
from soapvit.data.labelled import LabelledImages, load_labelled
from soapvit.data.transforms import ImageTransform
from soapvit.errors import SoapvitError
from soapvit.features import encode
from conftest import fit_soap
from soapvit.corrections import attach


def toy_images(n, classes, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return LabelledImages(images, labels, {"toy": seed, "n": n})


def mil_cache(n, classes=4, patches=16, dim=8, seed=0, cls_signal=0.0, signal=6.0):
    """Class signal in ONE random patch per image (and optionally in the CLS token)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.eye(dim)[:classes] * signal
    labels = torch.arange(n) % classes
    tokens = torch.randn(n, patches, dim, generator=g)
    where = torch.randint(0, patches, (n,), generator=g)
    tokens[torch.arange(n), where] += means[labels]
    prefix = torch.randn(n, 1, dim, generator=g) + cls_signal * means[labels][:, None]
    return TokenCache(prefix.half(), tokens.half(), labels, 1, (4, 4), {})


@pytest.mark.parametrize("optimizer,lr", [("lars", None), ("adamw", 2e-2)])
def test_abmilp_probe_finds_the_one_informative_patch_and_beats_mean(optimizer, lr):
    train, val = mil_cache(800, seed=0, signal=8), mil_cache(400, seed=1, signal=8)
    config = ProbeConfig(optimizer=optimizer, epochs=80, batch_size=64, warmup_epochs=2, lr=lr)
    scores = {}
    for pool in ("abmilp", "mean"):
        torch.manual_seed(0)
        clf = ProbeClassifier(make_pool(pool, 8, grid=(4, 4)), 8, 4)
        scores[pool] = train_probe(clf, train, val, config)
    assert scores["abmilp"].top1 >= 0.95
    assert scores["abmilp"].top1 > scores["mean"].top1 + 0.1
    assert scores["mean"].weight_entropy is None


def test_lars_cls_probe_reaches_95_percent_on_separable_toy_set():
    train, val = mil_cache(800, seed=2, cls_signal=1.0), mil_cache(400, seed=3, cls_signal=1.0)
    torch.manual_seed(0)
    clf = ProbeClassifier(make_pool("cls", 8), 8, 4)
    score = train_probe(clf, train, val, ProbeConfig(epochs=30, batch_size=64, warmup_epochs=3))
    assert score.top1 >= 0.95 and score.top5 == 1.0
    assert score.history[-1] < score.history[0]


def test_cache_matches_direct_encoding_is_reused_and_resumes(toy_backbone, tmp_path):
    backbone = toy_backbone
    data = toy_images(10, 2)
    cache = encode_images(backbone, data, image_size=16, cache_dir=tmp_path, part_size=4, batch_size=3)["original"]
    pixels = torch.stack([ImageTransform.for_backbone(backbone, 16)(image) for image in data.images])
    feats = encode(backbone, pixels, "last")
    torch.testing.assert_close(cache.patches.float(), feats.tokens[1].flatten(1, 2), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(cache.prefix.float(), feats.prefix[1], atol=2e-2, rtol=1e-2)
    assert cache.patches.dtype == torch.float16 and cache.meta["parts"] == 3 and cache.meta["parts_from_cache"] == 0
    again = encode_images(backbone, data, image_size=16, cache_dir=tmp_path, part_size=4)["original"]
    assert again.meta["parts_from_cache"] == 3 and again.meta["encode_seconds"] == 0
    assert torch.equal(again.patches, cache.patches)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    (folder / "part-00001.safetensors").unlink()
    (folder / "part-00002.safetensors").write_bytes(b"truncated")  # a damaged part is encoded again
    with pytest.warns(UserWarning, match="part-00002"):
        resumed = encode_images(backbone, data, image_size=16, cache_dir=tmp_path, part_size=4)["original"]
    assert resumed.meta["parts_from_cache"] == 1 and torch.equal(resumed.patches, cache.patches)
    other_size = encode_images(backbone, data, image_size=8, cache_dir=tmp_path, part_size=4)["original"]
    assert other_size.meta["parts_from_cache"] == 0 and other_size.grid == (2, 2)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_views_are_image_major_and_view_zero_is_plain(toy_backbone, tmp_path):
    backbone = toy_backbone
    data = toy_images(5, 2)
    plain = encode_images(backbone, data, image_size=16)["original"]
    viewed = encode_images(backbone, data, image_size=16, views=3, seed=1)["original"]
    assert viewed.patches.shape[0] == 15
    torch.testing.assert_close(viewed.plain().patches, plain.patches)
    assert not torch.equal(viewed.patches[1], viewed.patches[0])


def toy_backbone_and_head(tmp_path):
    """The toy backbone and a SOAP head fitted for it on six noise images."""
    backbone = ToyBackbone()
    head, _ = fit_soap(backbone, write_noise_images(tmp_path / "imgs"), synthetic=6, device="cpu", blocks="all",
                  image_size=16)
    return backbone, head


def test_soap_on_cached_tokens_equals_the_attached_backbone(tmp_path):
    backbone, head = toy_backbone_and_head(tmp_path)
    data = toy_images(6, 2)
    caches = encode_images(backbone, data, image_size=16, corrections={"soap": head})
    shortcut = corrected(caches["original"], head)
    direct = encode_images(attach(backbone, head), data, image_size=16)["original"]
    assert torch.equal(caches["soap"].patches, shortcut.patches)
    torch.testing.assert_close(shortcut.patches.float(), direct.patches.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(shortcut.prefix, direct.prefix)


def write_shards(folder, split, n, classes, size=12):
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"{split}-000000.tar.gz", "w:gz") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (size, size), (40 * (i % classes), 100, 20 * i % 255)).save(buf, "JPEG")
            for ext, payload in (("jpg", buf.getvalue()), ("cls", str(i % classes).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_data_arguments_shards_imagefolder_flat_and_selection(tmp_path):
    write_shards(tmp_path / "tin", "train", 12, 3)
    data = load_labelled(tmp_path / "tin", "train", per_class=2)
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2] and data.images.shape == (6, 3, 12, 12)
    assert data.identity["kind"] == "shards"
    assert load_labelled(f"{tmp_path / 'tin'}:train", "val").identity["split"] == "train"
    with pytest.raises(SoapvitError, match="no 'val-"):
        load_labelled(tmp_path / "tin", "val")
    for cls in ("b_cat", "a_dog"):
        (tmp_path / "folder" / "val" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10 + i, 10), (i, 0, 0)).save(tmp_path / "folder" / "val" / cls / f"{i}.png")
    data = load_labelled(tmp_path / "folder", "val", size=8)
    assert data.labels.tolist() == [0, 0, 1, 1] and data.identity["classes"] == ["a_dog", "b_cat"]
    flat = load_labelled(tmp_path / "folder" / "val" / "a_dog", "val", size=8)
    assert flat.labels.tolist() == [-1, -1]
    with pytest.raises(SoapvitError, match="does not exist"):
        load_labelled(tmp_path / "nope", "train")


def test_run_probe_linear_knn_and_soap_on_a_toy_backbone(tmp_path):
    backbone, head = toy_backbone_and_head(tmp_path)
    train, val = toy_images(24, 3, seed=0), toy_images(12, 3, seed=1)
    config = ProbeConfig(epochs=2, batch_size=8, warmup_epochs=1)
    run = run_probe(backbone, train, val, corrections={"soap": head}, config=config, cache_dir=tmp_path / "cache",
                    abmilp=AbMILPConfig(conditioning="pe"))
    assert [(r.pool, r.tokens) for r in run.rows()] == [
        (p, t) for t in ("original", "soap") for p in ("cls", "mean", "abmilp")]
    assert all(0 <= r.top1 <= r.top5 <= 1 for r in run.rows())
    assert run.results["original"]["cls"]["top1"] == run.results["soap"]["cls"]["top1"]  # CLS is left alone
    assert run.settings["cache_parts_reused"] == 0
    knn = run_probe(backbone, train, val, pools=("mean",), method="knn", cache_dir=tmp_path / "cache")
    assert knn.settings["cache_parts_reused"] == knn.settings["cache_parts"] == 2 and knn.seconds["encode"] == 0
    with pytest.raises(SoapvitError, match="knn"):
        run_probe(backbone, train, val, pools=("abmilp",), method="knn")


def test_attention_profile_matches_statistics_of_the_returned_maps():
    torch.manual_seed(0)
    backbone = VisionTransformerBackbone(ViTConfig(image_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2))
    data = toy_images(5, 1)
    profile = attention_profile(backbone, data, image_size=16, batch_size=2)
    pixels = torch.stack([ImageTransform.for_backbone(backbone, 16)(image) for image in data.images])
    maps = encode(backbone, pixels, "last", attentions="all").attentions
    for b in range(3):
        row = maps[b][:, :, 0, 1:].double()
        p = row / row.sum(-1, keepdim=True)
        expected = float((-(p * p.log()).sum(-1)).mean())
        stats = profile.results
        assert stats["entropy"][b] == pytest.approx(expected, rel=1e-5)
        assert stats["count90"][b] == pytest.approx(float(cls_attention_statistics(maps[b], 1)["count90"].mean()))
        assert stats["entropy"][b] <= profile.max_entropy + 1e-9
    assert profile.num_patches == 16 and profile.images == 5


@register_source("toyprobe")
def _toy_loader(name):
    return ToyBackbone()


def test_cli_probe_and_attention(tmp_path, run_cli):
    write_shards(tmp_path / "tin", "train", 12, 3, size=16)
    write_shards(tmp_path / "tin", "val", 6, 3, size=16)
    out = tmp_path / "probe.json"
    code, stdout, err = run_cli(["probe", "--model", "toyprobe:x", "--train", str(tmp_path / "tin"), "--val",
                                 str(tmp_path / "tin"), "--pool", "cls,abmilp", "--epochs", "2",
                                 "--probe-batch-size", "4", "--cache-dir", str(tmp_path / "c"), "--out", str(out)])
    assert code in (0, None), err
    result = json.loads(out.read_text())
    assert list(result["results"]["original"]) == ["cls", "abmilp"] and result["settings"]["n_train"] == 12
    assert "abmilp" in stdout
    code, _, err = run_cli(["probe", "--model", "toyprobe:x", "--train", str(tmp_path / "tin"), "--val",
                            str(tmp_path / "tin"), "--pool", "max"])
    assert code == 2 and "--pool" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["probe", "--model", "toyprobe:x", "--train", str(tmp_path / "none"), "--val",
                            str(tmp_path / "tin")])
    assert code == 2 and "--train" in err and "does not exist" in err
    code, _, err = run_cli(["attention", "--model", "toyprobe:x", "--images", str(tmp_path / "tin"), "--out",
                            str(tmp_path / "att")])
    assert code == 2 and "does not return attention maps" in err
