"""hf: adapter on tiny random configurations of every supported family, checked against the
models' own outputs (hidden states, attentions) and an independent key computation."""

import pytest
import torch
from torch import nn

from soapvit.backbones import load
from soapvit.errors import SoapvitError

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)


def _configs():
    import transformers as tf

    return {
        "vit": (tf.ViTConfig(**SMALL), tf.ViTModel, 1),
        "deit": (tf.DeiTConfig(**SMALL), tf.DeiTModel, 2),
        "vit_mae": (tf.ViTMAEConfig(**SMALL, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                    decoder_num_attention_heads=2, decoder_intermediate_size=32), tf.ViTMAEModel, 1),
        "dinov2": (tf.Dinov2Config(**{k: v for k, v in SMALL.items() if k != "intermediate_size"}), tf.Dinov2Model, 1),
        "dinov2_with_registers": (tf.Dinov2WithRegistersConfig(
            **{k: v for k, v in SMALL.items() if k != "intermediate_size"}, num_register_tokens=2),
            tf.Dinov2WithRegistersModel, 3),
        "dinov3_vit": (tf.DINOv3ViTConfig(**SMALL, num_register_tokens=2), tf.DINOv3ViTModel, 3),
        "ijepa": (tf.IJepaConfig(**SMALL), tf.IJepaModel, 0),
        "beit": (tf.BeitConfig(**SMALL, use_mean_pooling=False), tf.BeitModel, 1),
        "data2vec-vision": (tf.Data2VecVisionConfig(**SMALL, use_mean_pooling=False), tf.Data2VecVisionModel, 1),
    }


FAMILIES = list(_configs())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for name, (config, cls, prefix) in _configs().items():
        folder = tmp_path_factory.mktemp(name.replace("-", "_"))
        cls(config).eval().save_pretrained(folder)
        out[name] = (folder, cls, prefix)
    return out


def _first_layernorm(block: nn.Module) -> nn.Module:
    return next(m for m in block.modules() if isinstance(m, nn.LayerNorm))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tokens_keys_attentions(saved, family):
    folder, cls, prefix = saved[family]
    backbone = load(f"hf:{folder}")
    assert backbone.num_prefix_tokens == prefix and backbone.patch_size == 8 and backbone.num_blocks == 3
    pixels = torch.randn(2, 3, 32, 48)  # not the configured size: position embeddings interpolate
    with torch.no_grad():
        feats = backbone.forward_features(pixels, "all", keys=True, attentions=[1])
        kwargs = {"interpolate_pos_encoding": True} if family not in ("dinov2", "dinov2_with_registers", "dinov3_vit") else {}
        if family == "vit_mae":
            kwargs["noise"] = torch.arange(24.0).expand(2, 24)
        reference = backbone.model
        ref = reference(pixel_values=pixels, output_hidden_states=True, **kwargs)
    assert feats.tokens[2].shape == (2, 4, 6, 32) and feats.prefix[2].shape == (2, prefix, 32)
    norm = backbone.norm
    for b in range(3):
        expected = norm(ref.hidden_states[b + 1])
        got = torch.cat([feats.prefix[b], feats.tokens[b].flatten(1, 2)], dim=1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # keys: the last block's key projection applied to its normalised input
    last = backbone.blocks[-1]
    key_linear = next(m for n, m in last.named_modules() if n.endswith(("key", "k_proj")))
    with torch.no_grad():
        keys = key_linear(_first_layernorm(last)(ref.hidden_states[-2]))
    torch.testing.assert_close(feats.keys.flatten(1, 2), keys[:, prefix:], atol=1e-5, rtol=1e-5)
    # attention maps: rows are distributions over the whole sequence
    attn = feats.attentions[1]
    assert attn.shape == (2, 2, prefix + 24, prefix + 24)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5, rtol=0)


def test_vit_mae_tokens_are_in_patch_order(saved):
    """With masking off, a patch's token must depend on that patch: changing one patch of the
    image changes the first-block token at the same grid position the most."""
    folder, _, _ = saved["vit_mae"]
    backbone = load(f"hf:{folder}")
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., 8:16, 16:24] += 5.0  # patch at row 1, column 2
    with torch.no_grad():
        a = backbone.forward_features(x, [0], norm=False).tokens[0]
        b = backbone.forward_features(y, [0], norm=False).tokens[0]
    change = (a - b).norm(dim=-1)[0]
    assert tuple(divmod(int(change.argmax()), 4)) == (1, 2)


def test_bad_hf_id_is_a_one_line_error(tmp_path):
    with pytest.raises(SoapvitError, match="cannot load hf:"):
        load(f"hf:{tmp_path / 'missing'}")
