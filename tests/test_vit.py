"""Native ViT: a hand-written numpy forward pass from the state dict, position-embedding
resampling, the feature API and the fp16 safetensors round trip."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from soapvit.backbones.vit import (
    ViTConfig,
    VisionTransformerBackbone,
    resample_position_embedding,
)
from soapvit.errors import SoapvitError

CONFIG = ViTConfig(image_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=3, num_prefix_tokens=2)


def _layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def numpy_forward(state, cfg, image):
    """Reference forward of one image (3, H, W): returns per-block sequences, last keys, probs."""
    s = {k: v.detach().double().numpy() for k, v in state.items()}
    p, d, nh = cfg.patch_size, cfg.embed_dim, cfg.num_heads
    h, w = image.shape[1] // p, image.shape[2] // p
    patches = image.reshape(3, h, p, w, p).transpose(1, 3, 0, 2, 4).reshape(h * w, 3 * p * p)
    x = patches @ s["patch_embed.weight"].reshape(d, -1).T + s["patch_embed.bias"] + s["pos_embed"][0]
    x = np.concatenate([s["prefix_tokens"][0], x])
    seqs, probs_all, keys = [], [], None
    for i in range(cfg.depth):
        g = lambda n: s[f"blocks.{i}.{n}"]  # noqa: E731
        y = _layer_norm(x, g("norm1.weight"), g("norm1.bias"))
        qkv = y @ g("attn.qkv.weight").T + g("attn.qkv.bias")
        q, k, v = np.split(qkv, 3, axis=-1)
        keys = k
        heads = []
        probs = []
        hd = d // nh
        for j in range(nh):
            sl = slice(j * hd, (j + 1) * hd)
            logits = q[:, sl] @ k[:, sl].T / np.sqrt(hd)
            a = np.exp(logits - logits.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            probs.append(a)
            heads.append(a @ v[:, sl])
        x = x + np.concatenate(heads, -1) @ g("attn.proj.weight").T + g("attn.proj.bias")
        y = _layer_norm(x, g("norm2.weight"), g("norm2.bias"))
        x = x + _gelu(y @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
        seqs.append(x)
        probs_all.append(np.stack(probs))
    final = [_layer_norm(t, s["norm.weight"], s["norm.bias"]) for t in seqs]
    return seqs, final, keys, probs_all


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    bb = VisionTransformerBackbone(CONFIG).eval()
    with torch.no_grad():  # make norms and biases non-trivial
        for name, t in bb.vit.named_parameters():
            if "norm" in name or "bias" in name:
                t.add_(torch.randn_like(t) * 0.3)
    return bb


@torch.no_grad()
def test_forward_matches_numpy_reference(backbone):
    pixels = torch.randn(2, 3, 16, 16)
    feats = backbone.forward_features(pixels, "all", keys=True, attentions="all")
    feats_raw = backbone.forward_features(pixels, [0, 2], norm=False)
    for b in range(2):
        raw, final, keys, probs = numpy_forward(backbone.vit.state_dict(), CONFIG, pixels[b].double().numpy())
        for i in range(CONFIG.depth):
            np.testing.assert_allclose(feats.tokens[i][b].reshape(16, -1).numpy(), final[i][2:], atol=1e-4)
            np.testing.assert_allclose(feats.prefix[i][b].numpy(), final[i][:2], atol=1e-4)
            np.testing.assert_allclose(feats.attentions[i][b].numpy(), probs[i], atol=1e-5)
        np.testing.assert_allclose(feats_raw.tokens[2][b].reshape(16, -1).numpy(), raw[2][2:], atol=1e-4)
        np.testing.assert_allclose(feats.keys[b].reshape(16, -1).numpy(), keys[2:], atol=1e-4)
    assert set(feats_raw.tokens) == {0, 2}


def test_sdpa_path_equals_explicit_attention(backbone):
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        fast = backbone.vit(pixels)
        explicit = backbone.forward_features(pixels, "last", attentions="all")
    last = CONFIG.depth - 1
    torch.testing.assert_close(fast[:, 2:].reshape(3, 4, 4, -1), explicit.tokens[last], atol=1e-5, rtol=1e-5)


def test_position_embedding_resampling():
    pos = torch.randn(1, 16, 5)
    assert resample_position_embedding(pos, (4, 4)) is pos
    const = torch.full((1, 16, 5), 0.7)
    torch.testing.assert_close(resample_position_embedding(const, (6, 3)), torch.full((1, 18, 5), 0.7))
    # downsampling by 2 with antialias on a ramp: each output averages its 2x2 block's ramp
    ramp = torch.arange(4.0).repeat(4).reshape(1, 16, 1)  # value = column index
    down = resample_position_embedding(ramp, (2, 2)).reshape(2, 2)
    assert down[0, 0] < down[0, 1] and torch.allclose(down[:, 0], down[0, 0].expand(2))


def test_other_input_size_uses_resampled_positions(backbone):
    pixels = torch.randn(1, 3, 24, 20)
    feats = backbone.forward_features(pixels, "last")
    assert feats.tokens[CONFIG.depth - 1].shape == (1, 6, 5, CONFIG.embed_dim)
    vit = backbone.vit
    x = F.conv2d(pixels, vit.patch_embed.weight, vit.patch_embed.bias, stride=4).flatten(2).transpose(1, 2)
    pos = F.interpolate(vit.pos_embed.reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 5), mode="bicubic",
                        align_corners=False, antialias=True).permute(0, 2, 3, 1).reshape(1, 30, -1)
    torch.testing.assert_close(vit.embed_patches(pixels), x + pos)


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path, backbone):
    path = backbone.save(tmp_path / "m.safetensors", card={"objective": "test"})
    loaded = VisionTransformerBackbone.from_checkpoint(path)
    assert loaded.config == CONFIG and loaded.card == {"objective": "test"}
    assert loaded.num_prefix_tokens == 2 and loaded.patch_size == 4
    pixels = torch.randn(2, 3, 16, 16)
    a = backbone.forward_features(pixels).tokens[2]
    b = loaded.forward_features(pixels).tokens[2]
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # fp16 storage


def test_bad_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(SoapvitError, match="does not exist"):
        VisionTransformerBackbone.from_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SoapvitError, match="bad.safetensors"):
        VisionTransformerBackbone.from_checkpoint(bad)
