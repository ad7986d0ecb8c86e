"""The shipped pre-training zoo: six native ViTs that load offline as ``zoo:<name>``, same
architecture, cards with recipe and probe numbers, and a size limit for the whole zoo."""

from pathlib import Path

import pytest
import torch

import soapvit
from soapvit.backbones import load
from soapvit.backbones.vit import VisionTransformerBackbone

ZOO = Path(soapvit.__file__).parent / "assets" / "zoo"
NAMES = ("mae", "maskfeat", "semanticmim", "supervised", "dino", "ibot")


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


def test_zoo_fits_the_size_limit():
    files = [ZOO / f"{name}.safetensors" for name in NAMES]
    assert sum(f.stat().st_size for f in files) <= 20_000_000
