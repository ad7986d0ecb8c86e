"""timm: adapter, every family users load, checked against timm's own outputs.

timm is an optional extra. Its torchvision cannot load beside the development machine's CPU torch,
so ``.ci/run`` runs this file in an environment of its own (PyPI's torch + torchvision + timm),
where no test may be skipped. Without timm (the main environment) only the tests of the errors
run; the others skip with the reason.

Models are random (``pretrained=False``) tiny configurations of each family (2 blocks, width 64),
their weights perturbed so that attention is far from uniform: a missing RoPE, q/k norm, bias or
final norm changes the outputs by far more than the tolerances. References are timm's own:
``forward_features``, ``forward_intermediates``, and the q and k that timm's attention hands to
``F.scaled_dot_product_attention`` (captured by wrapping it), plus an independent recomputation of
q, k and the RoPE rotation from the weights written here.
"""

import contextlib
import importlib.abc
import importlib.util
import json
import math
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soapvit.backbones import load
from soapvit.errors import SoapvitError

from conftest import write_noise_images

HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(
    not HAS_TIMM, reason="timm is not installed here (.ci/run runs this file in its own timm environment)")
pytestmark = pytest.mark.timm

EVA02 = "eva02_tiny_patch14_224.mim_in22k"
TORCHVISION_ERROR = "operator torchvision::nms does not exist"

# (timm name, create_model overrides, default image size, prefix tokens)
FAMILIES = [
    pytest.param("vit_small_patch16_224.augreg_in21k_ft_in1k", {}, 224, 1, id="vit-augreg"),
    pytest.param("vit_base_patch16_224.mae", {}, 224, 1, id="vit-mae"),
    pytest.param("vit_small_patch16_224.dino", {}, 224, 1, id="vit-dino"),
    pytest.param("vit_small_patch16_224.augreg_in21k", {"qk_norm": True}, 224, 1, id="vit-qknorm"),
    pytest.param("vit_small_patch14_dinov2.lvd142m", {}, 224, 1, id="dinov2"),
    pytest.param("vit_small_patch14_reg4_dinov2.lvd142m", {}, 224, 5, id="dinov2-reg4"),
    pytest.param("deit3_small_patch16_224.fb_in22k_ft_in1k", {}, 224, 1, id="deit3"),
    pytest.param(EVA02, {}, 224, 1, id="eva02-mim-fused-qkv"),
    pytest.param("eva02_small_patch14_336.mim_in22k_ft_in1k", {}, 336, 1, id="eva02-336"),
    pytest.param("eva02_base_patch16_clip_224.merged2b", {}, 224, 1, id="eva02-clip-separate-qkv"),
    pytest.param("vit_small_patch16_rope_224.naver_in1k", {}, 224, 1, id="rope"),
    pytest.param("vit_small_patch16_rope_224.naver_in1k", {"qk_norm": True, "qkv_fused": False, "num_heads": 4,
                                                          "num_kv_heads": 2},
                 224, 1, id="rope-qknorm-gqa"),
    pytest.param("vit_small_patch16_rope_mixed_224.naver_in1k", {}, 224, 1, id="rope-mixed"),
    pytest.param("vit_base_patch16_rope_reg1_gap_256.sbb_in1k", {}, 256, 1, id="rope-reg1-gap"),
    pytest.param("vit_small_patch16_dinov3.lvd1689m", {}, 256, 5, id="dinov3-rope-half"),
    pytest.param("vit_base_patch16_clip_224.openai", {}, 224, 1, id="clip"),
    pytest.param("vit_base_patch16_siglip_224.v2_webli", {}, 224, 0, id="siglip"),
    pytest.param("vit_base_patch16_siglip_256.v2_webli", {}, 256, 0, id="siglip-256"),
    pytest.param("naflexvit_base_patch16_gap.e300_s576_in1k", {}, 384, 4, id="naflexvit"),
]
ROPE_IDS = ("eva02-mim-fused-qkv", "eva02-clip-separate-qkv", "rope-qknorm-gqa", "rope-mixed", "dinov3-rope-half")


def tiny_model(name, overrides=None, seed=0):
    """A random 2-block, width-64 model of the family, weights perturbed (sharp attention)."""
    import timm

    from soapvit.backbones.timm_models import _create

    kwargs = {"depth": 2, "embed_dim": 64, "num_heads": 2, **(overrides or {})}
    torch.manual_seed(seed)
    model = _create(timm, name, pretrained=False, **kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def backbone_of(model, name):
    from soapvit.backbones.timm_models import TimmBackbone

    return TimmBackbone(model, f"timm:{name}")


def inputs_for(backbone, seed=0):
    """The trained resolution, square and non-square (height kept, width ~3/4, patch multiple)."""
    size, p = backbone.image_size, backbone.patch_size
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, size, size, generator=g),
            torch.randn(2, 3, size, round(0.75 * size / p) * p, generator=g)]


@contextlib.contextmanager
def sdpa_calls():
    """The q and k that timm's attention passes to ``F.scaled_dot_product_attention``, in call order."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.detach().clone(), k.detach().clone()))
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = real


def intermediates(model, x, norm):
    """timm's ``forward_intermediates`` of every block as (patches, prefix) pairs."""
    out = model.forward_intermediates(x, norm=norm, output_fmt="NLC", intermediates_only=True,
                                      return_prefix_tokens=model.num_prefix_tokens > 0)
    if model.num_prefix_tokens == 0:  # SigLIP: timm returns the patches alone
        out = [(patches, patches[:, :0]) for patches in out]
    return out


def sequence(features, b):
    return torch.cat([features.prefix[b], features.tokens[b].flatten(1, 2)], dim=1)


def close(got, want, tol=1e-5):
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=tol * max(1.0, scale), rtol=tol)


# -- without timm, or with a broken torchvision: one-line errors (run in both environments) ----------
def test_missing_timm_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError(name="timm")
    with pytest.raises(SoapvitError, match=r"pip install 'soapvit\[timm\]'") as err:
        load("timm:vit_small_patch16_224")
    assert "\n" not in str(err.value)


class _TorchvisionForAnotherTorch(importlib.abc.MetaPathFinder):
    """Importing timm fails as it does with a CUDA torchvision beside a CPU torch."""

    def find_spec(self, name, path=None, target=None):
        if name == "timm":
            raise RuntimeError(f"{TORCHVISION_ERROR}\n(the rest of torch's message)")
        return None


def test_torchvision_for_another_torch_is_a_one_line_error(monkeypatch, tmp_path, run_cli):
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_TorchvisionForAnotherTorch(), *sys.meta_path])
    base = torch.__version__.split("+")[0]
    pair = f"0.{int(base.split('.')[1]) + 15}.0"
    with pytest.raises(SoapvitError) as err:
        load("timm:vit_small_patch16_224")
    message = str(err.value)
    assert "\n" not in message and TORCHVISION_ERROR in message
    assert f"pip install torch=={base} torchvision=={pair}" in message and "same build" in message
    images = write_noise_images(tmp_path / "imgs", n=2)
    code, _, stderr = run_cli(["fit", "--model", "timm:vit_small_patch16_224", "--images", str(images),
                               "--out", str(tmp_path / "h.safetensors")])
    assert code == 2 and "Traceback" not in stderr and TORCHVISION_ERROR in stderr
    assert len(stderr.strip().splitlines()) == 1


# -- every family: tokens, keys, attention maps, MLP activations --------------------------------------
@needs_timm
@pytest.mark.parametrize(("name", "overrides", "size", "prefix"), FAMILIES)
def test_family_matches_timm(name, overrides, size, prefix):
    model = tiny_model(name, overrides)
    backbone = backbone_of(model, name)
    assert (backbone.image_size, backbone.num_prefix_tokens, backbone.num_blocks, backbone.embed_dim) == \
        (size, prefix, 2, 64)
    cfg = model.pretrained_cfg
    assert backbone.image_mean == tuple(cfg["mean"]) and backbone.image_std == tuple(cfg["std"])
    for x in inputs_for(backbone):
        h, w = x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size
        with torch.no_grad():
            feats = backbone.forward_features(x, "all", keys=True, attentions="all")
            raw = backbone.forward_features(x, "all", norm=False)
            with sdpa_calls() as calls:
                ref = model.forward_features(x)
            inter, inter_raw = (intermediates(model, x, norm) for norm in (True, False))
        assert feats.tokens[1].shape == (2, h, w, 64) and feats.prefix[1].shape == (2, prefix, 64)
        # tokens: the last block equals forward_features (final norm, prefix split), every block
        # equals forward_intermediates, with and without the norm
        torch.testing.assert_close(sequence(feats, 1), ref, atol=0, rtol=0)
        for b, ((patches, pre), (patches_raw, pre_raw)) in enumerate(zip(inter, inter_raw)):
            close(feats.tokens[b].flatten(1, 2), patches)
            close(feats.prefix[b], pre)
            close(raw.tokens[b].flatten(1, 2), patches_raw)
            close(raw.prefix[b], pre_raw)
        # attention maps: softmax(q kᵀ/√d) of the q and k timm's attention computed (norms, RoPE, GQA)
        assert len(calls) == 2
        for b, (q, k) in enumerate(calls):
            want = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
            assert feats.attentions[b].shape == (2, model.blocks[b].attn.num_heads, prefix + h * w, prefix + h * w)
            close(feats.attentions[b], want)
        # keys: the k of the last block's attention, heads concatenated (grouped-query: one per kv head)
        q, k = calls[-1]
        groups = getattr(model.blocks[-1].attn, "num_kv_groups", 1)
        keys = k[:, ::groups].transpose(1, 2).flatten(2)
        close(feats.keys.flatten(1, 2), keys[:, prefix:])
        assert feats.keys.shape == (2, h, w, 64 // groups)


def own_rotation(x, emb, half):
    """RoPE written out: pairs (interleaved, or the two halves) rotated by the angles whose sin and cos
    the embedding holds (``emb = [sin, cos]`` along the last axis)."""
    sin, cos = emb.tensor_split(2, dim=-1)
    if half:
        a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        turned = torch.cat([-b, a], dim=-1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return x * cos + turned * sin


def own_qk(attn, x):
    """q, k from the attention module's weights, without the module's own code."""
    if attn.qkv is not None:
        w = attn.qkv.weight
        dim = w.shape[0] // 3
        bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(w.shape[0])
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat([attn.q_bias, torch.zeros(dim), attn.v_bias])
        wq, wk, bq, bk = w[:dim], w[dim: 2 * dim], bias[:dim], bias[dim: 2 * dim]
    else:
        wq, wk = attn.q_proj.weight, attn.k_proj.weight
        bq = attn.q_proj.bias if attn.q_proj.bias is not None else torch.zeros(wq.shape[0])
        bk = attn.k_proj.bias if attn.k_proj.bias is not None else torch.zeros(wk.shape[0])
    q = torch.einsum("bnc,oc->bno", x, wq) + bq
    k = torch.einsum("bnc,oc->bno", x, wk) + bk
    split = lambda t: t.reshape(t.shape[0], t.shape[1], -1, attn.head_dim).transpose(1, 2)  # noqa: E731
    return attn.q_norm(split(q)), attn.k_norm(split(k))


@needs_timm
@pytest.mark.parametrize(("name", "overrides"), [p.values[:2] for p in FAMILIES if p.id in ROPE_IDS],
                         ids=ROPE_IDS)
def test_rope_attention_recomputed_independently(name, overrides):
    """Attention maps of RoPE models equal softmax(q kᵀ/√d) of q, k projected from the weights and
    rotated here (patch tokens only), the same as what the backbone returns; without the rotation
    they differ."""
    model = tiny_model(name, overrides)
    backbone = backbone_of(model, name)
    x = inputs_for(backbone)[1]
    grid = (x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size)
    normed = {}
    handles = [blk.norm1.register_forward_hook(lambda _m, _i, out, b=b: normed.__setitem__(b, out))
               for b, blk in enumerate(model.blocks)]
    with torch.no_grad():
        feats = backbone.forward_features(x, "all", attentions="all")
        for handle in handles:
            handle.remove()
        emb = model.rope.get_embed(shape=grid)
        for b, blk in enumerate(model.blocks):
            attn = blk.attn
            q, k = own_qk(attn, normed[b])
            e = emb[b] if getattr(model, "rope_mixed", False) else emb
            p = model.num_prefix_tokens
            rq = torch.cat([q[:, :, :p], own_rotation(q[:, :, p:], e, attn.rotate_half)], dim=2)
            rk = torch.cat([k[:, :, :p], own_rotation(k[:, :, p:], e, attn.rotate_half)], dim=2)
            if rk.shape[1] != rq.shape[1]:
                rk = rk.repeat_interleave(rq.shape[1] // rk.shape[1], dim=1)
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            want = torch.softmax(rq @ rk.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            close(feats.attentions[b], want)
            unrotated = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            assert (feats.attentions[b] - unrotated).abs().max() > 0.05


@needs_timm
def test_keys_before_rope_on_request():
    from soapvit.backbones.timm_models import TimmBackbone

    model = tiny_model(EVA02)
    x = inputs_for(backbone_of(model, EVA02))[1]
    grid = (x.shape[-2] // 14, x.shape[-1] // 14)
    with torch.no_grad():
        rotated = TimmBackbone(model, "timm:x").forward_features(x, keys=True).keys.flatten(1, 2)
        plain = TimmBackbone(model, "timm:x", keys_rope=False).forward_features(x, keys=True).keys.flatten(1, 2)
        emb = model.rope.get_embed(shape=grid)
    heads = lambda t: t.reshape(2, t.shape[1], 2, 32).transpose(1, 2)  # noqa: E731
    close(heads(rotated), own_rotation(heads(plain), emb, half=False))
    assert (rotated - plain).abs().max() > 0.1


@needs_timm
@pytest.mark.parametrize(("name", "overrides"), [
    pytest.param("vit_small_patch16_224.augreg_in21k", {}, id="mlp-gelu"),
    pytest.param(EVA02, {}, id="eva02-swiglu-packed"),
    pytest.param("eva02_base_patch16_clip_224.merged2b", {}, id="eva02-swiglu-norm"),
    pytest.param("vit_small_patch16_rope_224.naver_in1k", {}, id="rope"),
])
def test_mlp_activation_is_what_feeds_fc2(name, overrides):
    """Each block's activation module outputs the hidden activation after the non-linearity: the MLP's
    output is fc2(norm(that)), its width fc2's input."""
    model = tiny_model(name, overrides)
    modules = backbone_of(model, name).mlp_activation_modules()
    assert len(modules) == 2
    acts, outs = {}, {}
    handles = []
    for b, (blk, module) in enumerate(zip(model.blocks, modules)):
        assert any(module is m for m in blk.mlp.modules())
        handles.append(module.register_forward_hook(lambda _m, _i, out, b=b: acts.setdefault(b, []).append(out)))
        handles.append(blk.mlp.register_forward_hook(lambda _m, _i, out, b=b: outs.__setitem__(b, out)))
    with torch.no_grad():
        model.forward_features(inputs_for(backbone_of(model, name))[1])
        for handle in handles:
            handle.remove()
        for b, blk in enumerate(model.blocks):
            assert len(acts[b]) == 1 and acts[b][0].shape[-1] == blk.mlp.fc2.in_features
            close(blk.mlp.fc2(blk.mlp.norm(acts[b][0])), outs[b])


@needs_timm
def test_unknown_mlp_or_attention_is_a_clear_error():
    model = tiny_model("vit_small_patch16_224.augreg_in21k")
    model.blocks[1].mlp = nn.Sequential(nn.Linear(64, 64))
    backbone = backbone_of(model, "custom")
    with pytest.raises(SoapvitError, match=r"block 1's MLP \(Sequential\)"):
        backbone.mlp_activation_modules()
    model.blocks[1].attn = nn.Identity()
    with pytest.raises(SoapvitError, match="block 1 .* no attention module"):
        backbone.forward_features(torch.randn(1, 3, 32, 32), keys=True)


@needs_timm
def test_dinov2_defaults_to_224_as_created_at_224():
    """The DINOv2 names default to 224 px (timm's cfg: 518), and their tokens at 224 equal those of the
    same weights created by timm at img_size=224 (the SOAP authors' set-up)."""
    import timm

    name = "vit_small_patch14_reg4_dinov2.lvd142m"
    model = tiny_model(name)
    assert model.pretrained_cfg["input_size"][-1] == 518
    backbone = backbone_of(model, name)
    assert backbone.image_size == 224
    at224 = timm.create_model(name, pretrained=True, num_classes=0, img_size=224, depth=2, embed_dim=64, num_heads=2,
                              pretrained_cfg_overlay={"state_dict": model.state_dict()}).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        close(sequence(backbone.forward_features(x), 1), at224.forward_features(x))


# -- weights: local files, the local Hugging Face cache, offline failures -------------------------
@pytest.fixture(scope="module")
def eva02_state():
    import timm

    torch.manual_seed(0)
    return timm.create_model(EVA02, pretrained=False).state_dict()


@pytest.fixture(scope="module")
def eva02_file(eva02_state, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "eva02.safetensors"
    save_file({k: v.contiguous() for k, v in eva02_state.items()}, str(path))
    return path


def assert_weights(backbone, state):
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert "state_dict" not in backbone.model.pretrained_cfg  # the overlay is not kept


@needs_timm
def test_local_weights_files(eva02_state, eva02_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = load(f"timm:{EVA02}@{eva02_file}")
    assert backbone.model_id == f"timm:{EVA02}@{eva02_file}" and backbone.image_size == 224
    assert_weights(backbone, eva02_state)
    x = torch.randn(1, 3, 224, 168)
    import timm

    ref = timm.create_model(EVA02, pretrained=False, num_classes=0, dynamic_img_size=True)
    ref.load_state_dict(eva02_state)
    with torch.no_grad():
        close(sequence(backbone.forward_features(x), 11), ref.eval().forward_features(x))
    # .pth in a training checkpoint's wrapper with a DataParallel prefix, .bin as a plain state dict
    torch.save({"model": {f"module.{k}": v for k, v in eva02_state.items()}, "epoch": 3}, tmp_path / "w.pth")
    torch.save(eva02_state, tmp_path / "w.bin")
    for name in ("w.pth", "w.bin"):
        assert_weights(load(f"timm:{EVA02}@{tmp_path / name}"), eva02_state)


class NotWeights:
    pass


@needs_timm
def test_local_weights_errors(eva02_state, tmp_path):
    torch.save({"model": eva02_state, "extra": NotWeights()}, tmp_path / "pickled.pth")
    cases = {
        f"{EVA02}@{tmp_path / 'pickled.pth'}": "weights_only",
        f"{EVA02}@{tmp_path / 'missing.safetensors'}": "does not exist",
        f"{EVA02}@{tmp_path / 'w.npz'}": "must be a file ending in",
        "vit_no_such_model_patch16": "unknown timm model",
    }
    torch.save({"head.weight": torch.zeros(2)}, tmp_path / "wrong.pth")
    cases[f"{EVA02}@{tmp_path / 'wrong.pth'}"] = "with weights"
    # a classifier checkpoint: timm drops the head and loads non-strictly, so a missing tensor would
    # stay random without the check
    import timm

    classifier = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    full = timm.create_model(classifier, pretrained=False).state_dict()
    assert "head.weight" in full
    torch.save(full, tmp_path / "classifier.pth")
    torch.save({k: v for k, v in full.items() if k != "blocks.11.mlp.fc2.bias"}, tmp_path / "partial.pth")
    cases[f"{classifier}@{tmp_path / 'partial.pth'}"] = r"lacks 1 tensor\(s\) .*blocks\.11\.mlp\.fc2\.bias"
    for name, message in cases.items():
        with pytest.raises(SoapvitError, match=message) as err:
            load(f"timm:{name}")
        assert "\n" not in str(err.value), name
    backbone = load(f"timm:{classifier}@{tmp_path / 'classifier.pth'}")
    assert_weights(backbone, {k: v for k, v in full.items() if not k.startswith("head.")})


def fake_hub_cache(root, state):
    """A Hugging Face cache holding timm/EVA02's model.safetensors, as a download leaves it."""
    from safetensors.torch import save_file

    repo = root / f"models--timm--{EVA02}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))


@needs_timm
@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE=1", "hub unreachable"])
def test_offline_loads_from_the_local_cache_in_seconds(how, eva02_state, tmp_path, monkeypatch):
    from huggingface_hub import constants

    import soapvit.backbones.hf as hf

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    if how == "HF_HUB_OFFLINE=1":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(hf, "hub_reachable", lambda *a, **k: pytest.fail("the hub was probed"))
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hf, "hub_reachable", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(SoapvitError, match=r"not in the local cache.*@/path/to/weights.safetensors") as err:
        load(f"timm:{EVA02}")
    assert time.monotonic() - start < 30 and "\n" not in str(err.value)
    fake_hub_cache(tmp_path, eva02_state)
    start = time.monotonic()
    backbone = load(f"timm:{EVA02}")
    assert time.monotonic() - start < 30
    assert_weights(backbone, eva02_state)
    if how == "hub unreachable":  # offline mode was switched on for the load only
        import os

        assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False


# -- through the CLI: fit and TokenCut offline on local weights ----------------------------------
def head_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    merged = {}
    for value in meta.values():
        with contextlib.suppress(ValueError, TypeError):
            loaded = json.loads(value)
            if isinstance(loaded, dict):
                merged.update(loaded)
    return merged


def fit_and_tokencut(run_cli, model_id, tmp_path, image_size):
    from eval_helpers import saliency_folder

    images = write_noise_images(tmp_path / "imgs", n=4, size=(64, 48))
    head = tmp_path / "head.safetensors"
    code, _, err = run_cli(["fit", "--model", model_id, "--images", str(images), "--synthetic", "4", "--limit", "4",
                            "--blocks", "last", "--device", "cpu", "--out", str(head)])
    assert code in (0, None), err
    code, out, err = run_cli(["inspect", str(head), "--json"])
    assert code in (0, None), err
    data = json.loads(out)
    assert data["backbone"] == model_id and list(data["blocks"]) == ["11"]
    meta = head_metadata(head)
    assert meta["image_size"] == image_size and meta["n_real"] == 4 and meta["n_synthetic"] == 4
    folder = saliency_folder(tmp_path / "ecssd")
    for features, extra in (("tokens", ["--head", str(head)]), ("keys", [])):
        out_json = tmp_path / f"tokencut-{features}.json"
        code, _, err = run_cli(["eval", "tokencut", "--model", model_id, "--images", str(folder / "images"),
                                "--masks", str(folder / "masks"), "--features", features, "--device", "cpu",
                                "--out", str(out_json), *extra])
        assert code in (0, None), err
        report = json.loads(out_json.read_text())
        assert report["kind"] == "tokencut" and report["settings"]["model"] == model_id
        assert report["results"]["original"]["n_images"] == 7
        assert 0 < report["results"]["original"]["maxFbeta"] <= 100
        if features == "tokens":
            assert "soap" in report["results"]


@needs_timm
def test_cli_eva02_local_safetensors_offline(run_cli, eva02_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fit_and_tokencut(run_cli, f"timm:{EVA02}@{eva02_file}", tmp_path, 224)


@needs_timm
def test_cli_dinov2_registers_local_pth_offline(run_cli, tmp_path, monkeypatch):
    """A second family through the CLI: DINOv2 with registers, .pth weights, at its 224 px default."""
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    name = "vit_small_patch14_reg4_dinov2.lvd142m"
    torch.save(timm.create_model(name, pretrained=False).state_dict(), tmp_path / "dinov2.pth")
    fit_and_tokencut(run_cli, f"timm:{name}@{tmp_path / 'dinov2.pth'}", tmp_path, 224)
