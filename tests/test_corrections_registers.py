"""Test-time registers (``registers``): calibration finds a planted register neuron, the wrapper
removes its high-norm tokens, and it equals a plain block-by-block recomputation."""

from __future__ import annotations

import pytest
import torch

from soapvit.backbones.vit import ViTConfig, VisionTransformerBackbone
from soapvit.corrections import METHODS, CorrectionSet, attach
from soapvit.corrections.registers import RegisterNeurons
from soapvit.errors import SoapvitError

BLOCK, NEURON = 1, 5  # the planted register neuron
PLANTED = [(0, 1), (2, 2), (3, 0)]  # (row, column) of the patches with a strong red channel
CONFIG = ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def toy_vit() -> VisionTransformerBackbone:
    """Random ViT whose neuron (1, 5) fires only where the patch's red channel is strong, and
    writes a huge vector into the residual stream there."""
    torch.manual_seed(0)
    backbone = VisionTransformerBackbone(CONFIG).eval()
    vit = backbone.vit
    with torch.no_grad():
        vit.patch_embed.weight[:, 0] = 0  # only channel 0 of the embedding reads red,
        vit.patch_embed.weight[0] = 0
        vit.patch_embed.weight[0, 0] = 1 / 64  # as the patch's mean red
        vit.patch_embed.bias.zero_()
        mlp = vit.blocks[BLOCK].mlp
        mlp.fc1.weight[NEURON] = 0
        mlp.fc1.weight[NEURON, 0] = 2.0
        mlp.fc1.bias[NEURON] = -4.0
        mlp.fc2.weight[:, NEURON] = 20 * torch.nn.functional.normalize(torch.randn(CONFIG.embed_dim), dim=0)
    return backbone


def images(n: int, seed: int) -> torch.Tensor:
    pixels = 0.5 * torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    for r, c in PLANTED:
        pixels[:, 0, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 4.0
    return pixels


def planted_mask() -> torch.Tensor:
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for r, c in PLANTED:
        mask[r, c] = True
    return mask


def calibrated(backbone, **params) -> RegisterNeurons:
    batches = [images(4, seed) for seed in range(3)]
    return RegisterNeurons(**{"top_k": 4, **params}).calibrate(backbone, iter(batches), backbone.num_blocks - 1)


def signed_max(values: torch.Tensor) -> torch.Tensor:
    """Per image, the value of largest magnitude over the tokens: ``(B, T)`` → ``(B,)``."""
    return torch.stack([row[row.abs().argmax()] for row in values])


def manual_forward(backbone, pixels, neurons, edits=None):
    """The native ViT block by block with the register appended at the END (the reference
    layout), the intervention written out; every block's final-norm patch tokens."""
    vit, p = backbone.vit, backbone.num_prefix_tokens
    x = vit.embed_patches(pixels)
    x = torch.cat([vit.prefix(x.shape[0]), x, torch.zeros(x.shape[0], 1, x.shape[2])], dim=1)
    out = {}
    for b, block in enumerate(vit.blocks):
        x = x + block.attn(block.norm1(x))[0]
        h = block.mlp.act(block.mlp.fc1(block.norm2(x)))
        for nb, n in neurons.tolist():
            if nb == b:
                h[:, -1, n] = signed_max(h[:, :, n])
                h[:, p:-1, n] = 0
        x = x + block.mlp.fc2(h)
        if edits and b in edits:
            x = torch.cat([edits[b](x[:, :-1]), x[:, -1:]], dim=1)
        out[b] = vit.norm(x)[:, p:-1].reshape(x.shape[0], 4, 4, -1)
    return out


def test_calibration_finds_the_planted_neuron():
    backbone = toy_vit()
    correction = calibrated(backbone)
    assert METHODS["registers"] is RegisterNeurons and correction.is_fitted
    assert correction.neurons_.dtype == torch.int64 and correction.neurons_.shape == (4, 2)
    assert correction.neurons_[0].tolist() == [BLOCK, NEURON]
    assert correction.neurons_[:, 0].max() <= 2  # highest_block defaults to outlier_block = -2
    assert correction.scores_[0] > 10 * correction.scores_[1]
    norms = backbone.forward_features(images(4, 7), 2, norm=False).tokens[2].norm(dim=-1)
    assert norms[:, ~planted_mask()].max() < correction.threshold_ < norms[:, planted_mask()].min()
    assert (correction.block_, correction.dim_) == (3, 32)


def test_wrap_removes_the_high_norm_tokens_and_keeps_the_rest():
    backbone = toy_vit()
    correction = calibrated(backbone)
    wrapped = attach(backbone, correction)
    assert not correction.maps_output(backbone)
    assert {**wrapped.describe(), "model_id": ""} == {**backbone.describe(), "model_id": ""}
    pixels = images(2, 11)
    with torch.no_grad():
        before = backbone.forward_features(pixels, "all", norm=False, keys=True, attentions="all")
        after = wrapped.forward_features(pixels, "all", norm=False, keys=True, attentions="all")
    assert {b: t.shape for b, t in after.tokens.items()} == {b: t.shape for b, t in before.tokens.items()}
    assert after.prefix[3].shape == before.prefix[3].shape and after.keys.shape == before.keys.shape
    assert {b: a.shape for b, a in after.attentions.items()} == {b: a.shape for b, a in before.attentions.items()}
    old, new, mask = before.tokens[3].norm(dim=-1), after.tokens[3].norm(dim=-1), planted_mask()
    typical = old[:, ~mask].median()
    assert old[:, mask].min() > 10 * typical  # the planted outliers
    assert new.max() < 2 * old[:, ~mask].max()  # gone: as the normal tokens
    rest = (after.tokens[3] - before.tokens[3])[:, ~mask].norm(dim=-1) / old[:, ~mask]
    assert rest.max() < 0.05


def test_wrap_equals_a_plain_recomputation_with_and_without_edits():
    backbone = toy_vit()
    correction = calibrated(backbone)
    wrapped = correction.wrap(backbone)
    pixels = images(3, 5)
    seen = []

    def edit(seq):
        seen.append(seq.shape)
        return seq + 0.5

    with torch.no_grad():
        for edits in (None, {1: edit}):
            got = wrapped.forward_features(pixels, "all", edits=edits).tokens
            expected = manual_forward(backbone, pixels, correction.neurons_, edits)
            for b in range(4):
                torch.testing.assert_close(got[b], expected[b], atol=1e-5, rtol=1e-5)
    assert seen == [(3, 17, 32), (3, 17, 32)]  # the edit sees the usual layout, without the register


def test_round_trip_through_the_corrections_file(tmp_path):
    backbone = toy_vit()
    correction = calibrated(backbone)
    path = CorrectionSet({"registers": correction}, {"backbone": backbone.model_id}).save(tmp_path / "c.safetensors")
    again = CorrectionSet.load(path)["registers"]
    assert isinstance(again, RegisterNeurons) and again.describe() == correction.describe()
    assert again.digest() == correction.digest()
    assert torch.equal(again.neurons_, correction.neurons_) and again.neurons_.dtype == torch.int64
    pixels = images(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(again.wrap(backbone)(pixels), correction.wrap(backbone)(pixels), rtol=0, atol=0)


def test_parameters_and_failures():
    for bad in (dict(top_k=0), dict(threshold=-1.0), dict(outlier_block=1.5), dict(highest_block="x")):
        with pytest.raises(SoapvitError):
            RegisterNeurons(**bad)
    backbone = toy_vit()
    with pytest.raises(SoapvitError, match="lower --threshold"):
        calibrated(backbone, threshold=1e6)
    with pytest.raises(SoapvitError, match="top-k"):
        calibrated(backbone, top_k=10_000)
    with pytest.raises(SoapvitError, match="out of range"):
        calibrated(backbone, outlier_block=9)
    correction = calibrated(backbone)
    x = torch.randn(2, 17, 32)
    args, kwargs = correction.wrap(backbone)._enter(None, (), {"hidden_states": x, "other": 1})
    assert args == () and kwargs["other"] == 1 and kwargs["hidden_states"].shape == (2, 18, 32)
    assert torch.equal(kwargs["hidden_states"][:, 1], torch.zeros(2, 32))


def test_shift_moves_the_signed_maximum_and_keeps_the_prefix():
    backbone = toy_vit()
    correction = calibrated(backbone)
    correction.neurons_ = torch.tensor([[0, 2]])
    acts = torch.arange(20.0).reshape(1, 5, 4)  # CLS, register, 3 patches; 4 neurons
    acts[0, :, 2] = torch.tensor([0.5, 0.0, -3.0, 1.0, 2.0])
    out = correction.wrap(backbone)._shift(torch.tensor([2]), None, None, acts)
    assert out[0, :, 2].tolist() == [0.5, -3.0, 0.0, 0.0, 0.0]
    assert torch.equal(out[..., [0, 1, 3]], acts[..., [0, 1, 3]])


# -- Hugging Face --------------------------------------------------------------------------------

def tiny_dinov2():
    transformers = pytest.importorskip("transformers")
    from soapvit.backbones.hf import HFBackbone

    torch.manual_seed(1)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                       image_size=32, patch_size=8)
    return HFBackbone(transformers.Dinov2Model(config).eval(), "hf:tiny-dinov2")


def hooked_reference(backbone, pixels, neurons):
    """The hf model with the register appended at the END by the test's own hooks."""
    acts = backbone.mlp_activation_modules()
    p = backbone.num_prefix_tokens

    def enter(_m, args):
        x = args[0]
        return (torch.cat([x, torch.zeros(x.shape[0], 1, x.shape[2])], 1), *args[1:])

    def shift(n, _m, _i, out):
        out = out.clone()
        out[:, -1, n] = signed_max(out[:, :, n])
        out[:, p:-1, n] = 0
        return out

    handles = [backbone.block_modules()[0].register_forward_pre_hook(enter)]
    handles += [acts[b].register_forward_hook(lambda m, i, o, n=n: shift(n, m, i, o)) for b, n in neurons.tolist()]
    try:
        raw = backbone._run(pixels, [0, 1, 2], {0, 1, 2}, False, [], {})
    finally:
        for h in handles:
            h.remove()
    return {b: h[:, :-1] for b, h in raw.hidden.items()}


@pytest.mark.parametrize("dead", [False, True])
def test_hf_wrap_keeps_shapes_and_matches_hooks(dead):
    backbone = tiny_dinov2()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    correction = RegisterNeurons(outlier_block=-1, threshold=1e-6, top_k=5).calibrate(backbone, [pixels], 2)
    assert correction.neurons_.shape == (5, 2)
    if dead:  # neurons whose activation is zero everywhere: only the zero register is added
        for b, n in correction.neurons_.tolist():
            mlp = backbone.block_modules()[b].mlp
            with torch.no_grad():
                mlp.fc1.weight[n] = 0
                mlp.fc1.bias[n] = 0
    wrapped = correction.wrap(backbone)
    with torch.no_grad():
        before = backbone.forward_features(pixels, "all", keys=True, attentions="all")
        after = wrapped.forward_features(pixels, "all", keys=True, attentions="all")
        raw = wrapped._run(pixels, [0, 1, 2], {0, 1, 2}, False, [], {})
        expected = hooked_reference(backbone, pixels, correction.neurons_)
    assert after.keys.shape == before.keys.shape and after.prefix[2].shape == before.prefix[2].shape
    assert {b: a.shape for b, a in after.attentions.items()} == {b: a.shape for b, a in before.attentions.items()}
    for b in range(3):
        assert after.tokens[b].shape == before.tokens[b].shape
        torch.testing.assert_close(raw.hidden[b], expected[b], atol=1e-5, rtol=1e-5)
    if dead:  # not equal to the original: the zero register takes a share of the attention
        assert (after.tokens[2] - before.tokens[2]).norm() < 0.02 * before.tokens[2].norm()


def test_hf_refuses_unhookable_activations():
    transformers = pytest.importorskip("transformers")
    from soapvit.backbones.hf import ACTIVATION_NAMES, HFBackbone

    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8, use_swiglu_ffn=True)
    with pytest.raises(SoapvitError, match="gated MLP"):
        HFBackbone(transformers.Dinov2Model(config).eval(), "hf:gated").mlp_activation_modules()
    backbone = tiny_dinov2()
    mlp = backbone.block_modules()[1].mlp
    name = next(n for n in ACTIVATION_NAMES if hasattr(mlp, n))  # the attribute differs across versions
    delattr(mlp, name)
    setattr(mlp, name, torch.nn.functional.gelu)
    with pytest.raises(SoapvitError, match="plain function"):
        backbone.mlp_activation_modules()
