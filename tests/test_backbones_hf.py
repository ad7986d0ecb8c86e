"""``hf:`` adapter against independent transformers calls on tiny random models of every family."""

import json

import pytest
import torch
import torch.nn.functional as F

from soapvit.backbones import IMAGENET_MEAN, IMAGENET_STD, load
from soapvit.errors import SoapvitError

transformers = pytest.importorskip("transformers")

SIZE, PATCH, DEPTH, HEADS, DIM = 32, 8, 2, 4, 32
COMMON = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH)


def _config(family: str):
    t = transformers
    mlp = dict(intermediate_size=2 * DIM)
    return {
        "vit": lambda: t.ViTConfig(**COMMON, **mlp),
        "deit": lambda: t.DeiTConfig(**COMMON, **mlp),
        "vit_mae": lambda: t.ViTMAEConfig(**COMMON, **mlp, mask_ratio=0.75, decoder_hidden_size=16,
                                          decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                          decoder_intermediate_size=32),
        "dinov2": lambda: t.Dinov2Config(**COMMON, mlp_ratio=2),
        "dinov2_with_registers": lambda: t.Dinov2WithRegistersConfig(**COMMON, mlp_ratio=2, num_register_tokens=4),
        "dinov3_vit": lambda: t.DINOv3ViTConfig(**COMMON, **mlp, num_register_tokens=4),
        "ijepa": lambda: t.IJepaConfig(**COMMON, **mlp),
        "beit": lambda: t.BeitConfig(**COMMON, **mlp, use_mean_pooling=False),  # a final token norm
        "data2vec-vision": lambda: t.Data2VecVisionConfig(**COMMON, **mlp),  # mean pooling: no token norm
    }[family]()


# family → prefix tokens: CLS, + registers, + DeiT's distillation token; I-JEPA has none
PREFIX = {"vit": 1, "deit": 2, "vit_mae": 1, "dinov2": 1, "dinov2_with_registers": 5, "dinov3_vit": 5,
          "ijepa": 0, "beit": 1, "data2vec-vision": 1}
FAMILIES = list(PREFIX)


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, folder) of a tiny random model saved with ``save_pretrained``."""
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_config(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder


def _reference(folder, family):
    """The same checkpoint loaded independently with eager attention (attention maps available)."""
    extra = {"mask_ratio": 0.0} if family == "vit_mae" else {}
    return transformers.AutoModel.from_pretrained(folder, attn_implementation="eager", **extra).eval()


def _reference_forward(model, family, pixels, **kwargs):
    if family == "vit_mae":  # the identity permutation keeps the patches in order
        n = (pixels.shape[-2] // PATCH) * (pixels.shape[-1] // PATCH)
        kwargs["noise"] = torch.arange(n, dtype=torch.float32).expand(pixels.shape[0], n)
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True, output_attentions=True, **kwargs)


def _sequence(features, block):
    return torch.cat([features.prefix[block], features.tokens[block].flatten(1, 2)], dim=1)


def test_matches_independent_forward(saved):
    family, folder = saved
    backbone = load(f"hf:{folder}")
    assert backbone.num_prefix_tokens == PREFIX[family]
    assert (backbone.patch_size, backbone.embed_dim, backbone.num_blocks, backbone.num_heads) == (PATCH, DIM, DEPTH, HEADS)
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    implementation = backbone.model.config._attn_implementation
    ref = _reference_forward(_reference(folder, family), family, pixels)
    grid = SIZE // PATCH
    with torch.no_grad():
        raw = backbone.forward_features(pixels, "all", norm=False, keys=True, attentions="all")
        normed = backbone.forward_features(pixels, "last", norm=True)
    assert ref.hidden_states[0].shape[1] == PREFIX[family] + grid * grid
    for b in range(DEPTH):
        assert raw.tokens[b].shape == (2, grid, grid, DIM)
        assert raw.prefix[b].shape == (2, PREFIX[family], DIM)
        torch.testing.assert_close(_sequence(raw, b), ref.hidden_states[b + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(raw.attentions[b], ref.attentions[b], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_sequence(normed, DEPTH - 1), ref.last_hidden_state, atol=1e-5, rtol=1e-5)

    # keys recomputed from the last layer's own modules: pre-norm, then the key projection
    layer = backbone.blocks[-1]
    pre_norm = getattr(layer, "layernorm_before", None) or layer.norm1
    key = backbone.last_keys
    with torch.no_grad():
        expected = F.linear(pre_norm(ref.hidden_states[DEPTH - 1]), key.weight, key.bias)
    assert raw.keys.shape == (2, grid, grid, DIM)
    torch.testing.assert_close(raw.keys.flatten(1, 2), expected[:, PREFIX[family]:], atol=1e-5, rtol=1e-5)
    # asking for attention maps switched to eager attention for that call only
    assert backbone.model.config._attn_implementation == implementation


def test_other_input_sizes(saved):
    family, folder = saved
    backbone = load(f"hf:{folder}")
    pixels = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    model = _reference(folder, family)
    interpolate = {"interpolate_pos_encoding": True} if family not in ("dinov2", "dinov2_with_registers", "dinov3_vit") else {}
    ref = _reference_forward(model, family, pixels, **interpolate)
    with torch.no_grad():
        features = backbone.forward_features(pixels, "last", norm=True)
    assert features.tokens[DEPTH - 1].shape == (1, 5, 7, DIM)
    torch.testing.assert_close(_sequence(features, DEPTH - 1), ref.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_vitmae_tokens_in_patch_order(tmp_path):
    """A forward with a random shuffle, un-shuffled by hand, gives our (unshuffled) tokens."""
    torch.manual_seed(0)
    transformers.AutoModel.from_config(_config("vit_mae")).save_pretrained(tmp_path)
    backbone = load(f"hf:{tmp_path}")
    model = _reference(tmp_path, "vit_mae")
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    n = (SIZE // PATCH) ** 2
    noise = torch.rand(2, n, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(pixel_values=pixels, noise=noise)
        ours = backbone.forward_features(pixels, "last", norm=True)
    shuffled = out.last_hidden_state[:, 1:]
    assert not torch.equal(out.ids_restore, torch.arange(n).expand(2, n))  # the shuffle did permute
    unshuffled = torch.gather(shuffled, 1, out.ids_restore[..., None].expand(-1, -1, DIM))
    torch.testing.assert_close(ours.tokens[DEPTH - 1].flatten(1, 2), unshuffled, atol=1e-5, rtol=1e-5)
    assert backbone.model.config.mask_ratio == 0.0


def test_preprocessing_from_folder(tmp_path):
    torch.manual_seed(0)
    transformers.AutoModel.from_config(_config("dinov2")).save_pretrained(tmp_path)
    default = load(f"hf:{tmp_path}")
    assert (default.image_mean, default.image_std, default.image_size) == (IMAGENET_MEAN, IMAGENET_STD, SIZE)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.75], "do_center_crop": True,
         "crop_size": {"height": 48, "width": 48}, "size": {"shortest_edge": 56}}))
    custom = load(f"hf:{tmp_path}")
    assert (custom.image_mean, custom.image_std, custom.image_size) == ((0.5,) * 3, (0.25, 0.5, 0.75), 48)


@pytest.mark.parametrize("make", ["missing", "empty", "unsupported"])
def test_bad_sources_are_one_line_errors(tmp_path, make):
    folder = tmp_path / "model"
    if make != "missing":
        folder.mkdir()
    if make == "unsupported":
        transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8).save_pretrained(folder)
    with pytest.raises(SoapvitError) as err:
        load(f"hf:{folder}")
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    if make == "unsupported":
        assert "'bert' is not supported" in message


def test_an_unreachable_hub_fails_fast_with_a_hint(monkeypatch):
    import time

    from soapvit.backbones import hf

    monkeypatch.setattr(hf, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(SoapvitError, match="hub is not reachable.*local folder"):
        hf.load_hf("soapvit-tests/no-such-model")
    assert time.perf_counter() - start < 20  # no network retries


def test_a_folder_without_preprocessing_config_warns_what_is_assumed(tmp_path):
    from soapvit.backbones.hf import preprocessing

    with pytest.warns(UserWarning, match="no preprocessor_config.json; assuming the ImageNet mean/std"):
        assert preprocessing(str(tmp_path)) == {}
