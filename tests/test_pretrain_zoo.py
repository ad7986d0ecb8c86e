"""The shipped pre-training zoo: six native ViTs that load offline as ``zoo:<name>``, same
architecture, trained final norms, cards with recipe and probe numbers, a size limit for the
whole zoo; and the script that trains it (``scripts/train_zoo.py``)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from pretrain_helpers import toy_images, write_shards

import soapvit
from soapvit.backbones import load
from soapvit.backbones.vit import VisionTransformerBackbone, read_card
from soapvit.pretrain import MIM_OBJECTIVES

ZOO = Path(soapvit.__file__).parent / "assets" / "zoo"
NAMES = ("mae", "maskfeat", "semanticmim", "supervised", "dino", "ibot")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_zoo.py"


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_loads_offline_with_its_card(name):
    backbone = load(f"zoo:{name}")
    assert isinstance(backbone, VisionTransformerBackbone) and backbone.model_id == f"zoo:{name}"
    assert (backbone.patch_size, backbone.image_size, backbone.num_blocks) == (8, 64, 6)
    assert backbone.num_prefix_tokens == (8 if name == "semanticmim" else 1)
    card = backbone.card
    assert card["objective"] == name and card["train_cpu_s"] > 0 and card["images_seen"] > 0
    assert {"knn_cls_top1", "knn_mean_top1"} <= set(card["probe"])
    with torch.no_grad():
        feats = backbone.forward_features(torch.randn(2, 3, 64, 64), "all", keys=True, attentions=[5])
    assert feats.tokens[5].shape == (2, 8, 8, backbone.embed_dim) and torch.isfinite(feats.tokens[5]).all()
    assert feats.attentions[5].shape == (2, backbone.num_heads, 64 + backbone.num_prefix_tokens, 64 + backbone.num_prefix_tokens)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_final_norm_is_trained(name):
    """Probes and SOAP read final-norm tokens: a norm still at its initial value (weight 1,
    bias 0) means training never reached it."""
    norm = load(f"zoo:{name}").vit.norm
    assert not torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert not torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_zoo_fits_the_size_limit():
    files = [ZOO / f"{name}.safetensors" for name in NAMES]
    assert sum(f.stat().st_size for f in files) <= 20_000_000


def test_mim_class_of_the_figures():
    """iBOT trains by masked patch distillation: MIM (solid in the zoo figures) like MAE, MaskFeat
    and SemanticMIM; supervised and DINO are not (dashed)."""
    assert set(MIM_OBJECTIVES) == {"mae", "maskfeat", "semanticmim", "ibot"}


def test_script_trains_and_exports_a_zoo_model(tmp_path):
    spec = importlib.util.spec_from_file_location("train_zoo", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    images, labels = toy_images(16, size=64)
    write_shards(tmp_path / "shards", images, labels)
    threads = torch.get_num_threads()
    try:  # the script runs single-threaded
        script.main(["--data", str(tmp_path / "shards"), "--out", str(tmp_path / "zoo"), "--work",
                     str(tmp_path / "work"), "--names", "semanticmim", "--cpu-minutes", "0", "--epochs", "1",
                     "--batch-size", "8"])
    finally:
        torch.set_num_threads(threads)
    card = read_card(tmp_path / "zoo" / "semanticmim.safetensors")
    assert card["objective"] == "semanticmim" and card["steps"] == 2 and card["finished_schedule"]
    assert card["recipe"]["vit"] == script.ZOO_VIT and card["recipe"]["cpu_budget_s"] is None
