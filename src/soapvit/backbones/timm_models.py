"""``timm:<name>``: timm Vision Transformers (optional extra: ``pip install soapvit[timm]``).

Block outputs and the last block's keys are captured with forward hooks on ``model.blocks`` and
the last block's fused ``attn.qkv`` projection; attention maps are recomputed from q and k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SoapvitError
from .base import Backbone, RawOutput
from .registry import register_source


def _import_timm():
    try:
        import timm
    except ImportError:
        raise SoapvitError("timm: models need the timm extra: pip install 'soapvit[timm]'") from None
    return timm


class TimmBackbone(Backbone):
    """A timm ``VisionTransformer`` (``blocks``, ``norm``, ``num_prefix_tokens``)."""

    def __init__(self, model, model_id: str) -> None:
        cfg = model.pretrained_cfg or {}
        size = cfg.get("input_size", (3, 224, 224))[-1]
        patch = model.patch_embed.patch_size
        super().__init__(model_id, patch_size=patch[0] if isinstance(patch, tuple) else patch,
                         embed_dim=model.embed_dim, num_blocks=len(model.blocks),
                         num_heads=model.blocks[-1].attn.num_heads, num_prefix_tokens=model.num_prefix_tokens,
                         image_size=size, image_mean=cfg.get("mean", (0.485, 0.456, 0.406)),
                         image_std=cfg.get("std", (0.229, 0.224, 0.225)))
        self.model = model

    def block_modules(self):
        return self.model.blocks

    def _run(self, pixels: Tensor, blocks, norm: bool, keys: bool, attentions, edits) -> RawOutput:
        captured: dict[int, Tensor] = {}
        qkv: dict[int, Tensor] = {}
        # edit hooks first: forward hooks run in registration order, so the capture sees the edit
        handles = [self.model.blocks[b].register_forward_hook(lambda _m, _i, out, fn=fn: fn(out))
                   for b, fn in edits.items()]
        handles += [self.model.blocks[b].register_forward_hook(
            lambda _m, _i, out, b=b: captured.__setitem__(b, out)) for b in blocks]
        for b in {*attentions, *([self.num_blocks - 1] if keys else [])}:
            handles.append(self.model.blocks[b].attn.qkv.register_forward_hook(
                lambda _m, _i, out, b=b: qkv.__setitem__(b, out)))
        try:
            self.model.forward_features(pixels)
        finally:
            for h in handles:
                h.remove()
        hidden = {b: self.model.norm(captured[b]) if norm else captured[b] for b in blocks}
        heads = self.num_heads
        key_out = None
        if keys:
            key_out = qkv[self.num_blocks - 1].chunk(3, dim=-1)[1]
        attn = {}
        for b in attentions:
            q, k, _ = qkv[b].chunk(3, dim=-1)
            shape = (q.shape[0], q.shape[1], heads, -1)
            q, k = q.reshape(shape).transpose(1, 2), k.reshape(shape).transpose(1, 2)
            attention = self.model.blocks[b].attn
            if hasattr(attention, "q_norm"):
                q, k = attention.q_norm(q), attention.k_norm(k)
            attn[b] = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        return RawOutput(hidden=hidden, keys=key_out, attentions=attn)


@register_source("timm")
def load_timm(name: str) -> Backbone:
    timm = _import_timm()
    try:
        try:  # dynamic_img_size: position embeddings resampled for any input size
            model = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True)
        except TypeError:  # a model without that option: fixed input size
            model = timm.create_model(name, pretrained=True, num_classes=0)
    except (RuntimeError, OSError, ValueError) as err:
        raise SoapvitError(f"cannot load timm:{name}: {str(err).splitlines()[0] if str(err) else err!r}") from err
    if not hasattr(model, "blocks"):
        raise SoapvitError(f"timm:{name} is not a Vision Transformer with .blocks")
    return TimmBackbone(model.eval(), f"timm:{name}")
