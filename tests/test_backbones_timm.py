"""timm: adapter. timm is an optional extra (not installable on the development machine); without
it the source must fail with a one-line instruction."""

import importlib.util

import pytest

from soapvit.backbones import load
from soapvit.errors import SoapvitError

HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed")
def test_missing_timm_is_a_one_line_error():
    with pytest.raises(SoapvitError, match=r"pip install 'soapvit\[timm\]'") as err:
        load("timm:vit_small_patch16_224")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not HAS_TIMM, reason="the timm extra is not installed")
def test_timm_tokens_match_forward_features():
    import timm
    import torch

    from soapvit.backbones.timm_models import TimmBackbone

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, reg_tokens=2,
                              dynamic_img_size=True).eval()
    backbone = TimmBackbone(model, "timm:test")
    x = torch.randn(2, 3, 224, 160)  # not the trained size: position embeddings are resampled
    with torch.no_grad():
        feats = backbone.forward_features(x, "all", keys=True, attentions=[0])
        ref = model.forward_features(x)
    assert backbone.num_prefix_tokens == 3 and feats.tokens[11].shape == (2, 14, 10, 192)
    got = torch.cat([feats.prefix[11], feats.tokens[11].flatten(1, 2)], dim=1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.attentions[0].sum(-1), torch.ones(2, 3, 143), atol=1e-5, rtol=0)
