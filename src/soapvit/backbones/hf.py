"""``hf:<repo id or local folder>``: Vision Transformers from Hugging Face transformers.

One adapter for every supported family (ViT/DeiT, ViTMAE, Dinov2, Dinov2WithRegisters, DINOv3
ViT, I-JEPA, BEiT, Data2Vec-Vision). Block outputs, the last block's keys and attention maps are
captured with forward hooks on the model's own layer and key-projection modules, so a single
forward pass serves any set of blocks.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import SoapvitError
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, RawOutput
from .registry import register_source

SUPPORTED = ("vit", "deit", "vit_mae", "dinov2", "dinov2_with_registers", "dinov3_vit", "ijepa", "beit", "data2vec-vision")
NO_CLS = ("ijepa",)
EAGER_ONLY = ("data2vec-vision",)  # cannot switch attention implementation after loading
KEY_MODULE = re.compile(r"(^|\.)(key|k_proj)$")


def _layers(model: nn.Module, depth: int) -> nn.ModuleList:
    """The model's transformer blocks: the ModuleList with ``depth`` entries."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise SoapvitError(f"cannot find the {depth} transformer blocks of {type(model).__name__}")


def _final_norm(model: nn.Module) -> nn.Module:
    for name in ("layernorm", "norm"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    return nn.Identity()


def _key_module(block: nn.Module) -> nn.Module | None:
    for name, module in block.named_modules():
        if KEY_MODULE.search(name) and isinstance(module, nn.Linear):
            return module
    return None


def _num_prefix_tokens(config) -> int:
    prefix = 0 if config.model_type in NO_CLS else 1
    prefix += int(getattr(config, "num_register_tokens", 0) or 0)
    if config.model_type == "deit":
        prefix += 1  # distillation token
    return prefix


class HFBackbone(Backbone):
    """A transformers vision model behind the :class:`Backbone` API."""

    def __init__(self, model: nn.Module, model_id: str, *, image_size: int | None = None,
                 image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD) -> None:
        config = model.config
        if config.model_type not in SUPPORTED:
            raise SoapvitError(f"{model_id}: model type {config.model_type!r} is not supported ({', '.join(SUPPORTED)})")
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        size = image_size or (config.image_size if isinstance(config.image_size, int) else config.image_size[0])
        super().__init__(model_id, patch_size=patch, embed_dim=config.hidden_size,
                         num_blocks=config.num_hidden_layers, num_heads=config.num_attention_heads,
                         num_prefix_tokens=_num_prefix_tokens(config), image_size=size,
                         image_mean=image_mean, image_std=image_std)
        self.model = model
        self.blocks = _layers(model, config.num_hidden_layers)
        self.norm = _final_norm(model)
        self._forward_params = set(inspect.signature(model.forward).parameters)

    def _run(self, pixels: Tensor, blocks, norm: bool, keys: bool, attentions) -> RawOutput:
        captured: dict[int, Tensor] = {}
        key_out: list[Tensor] = []
        handles = []
        for b in blocks:
            handles.append(self.blocks[b].register_forward_hook(
                lambda _m, _i, out, b=b: captured.__setitem__(b, out[0] if isinstance(out, tuple) else out)))
        if keys:
            key_module = _key_module(self.blocks[-1])
            if key_module is None:
                raise SoapvitError(f"{self.model_id}: no key projection found in the last block")
            handles.append(key_module.register_forward_hook(lambda _m, _i, out: key_out.append(out)))
        kwargs = {}
        if "interpolate_pos_encoding" in self._forward_params:
            kwargs["interpolate_pos_encoding"] = True
        if self.model.config.model_type == "vit_mae":
            n = pixels.shape[-2] // self.patch_size * (pixels.shape[-1] // self.patch_size)
            kwargs["noise"] = torch.arange(n, device=pixels.device, dtype=torch.float32).expand(pixels.shape[0], n)
        want_attn = bool(attentions)
        previous = getattr(self.model.config, "_attn_implementation", None)
        if want_attn and previous != "eager":
            self.model.set_attn_implementation("eager")
        try:
            out = self.model(pixel_values=pixels, output_attentions=want_attn, **kwargs)
        finally:
            for h in handles:
                h.remove()
            if want_attn and previous not in (None, "eager"):
                self.model.set_attn_implementation(previous)
        hidden = {b: self.norm(captured[b]) if norm else captured[b] for b in blocks}
        attn = {b: out.attentions[b] for b in attentions} if want_attn else {}
        return RawOutput(hidden=hidden, keys=key_out[0] if keys else None, attentions=attn)


def _preprocessing(source: str) -> dict:
    """mean/std/size from the checkpoint's ``preprocessor_config.json`` when there is one."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "preprocessor_config.json"))
        except Exception:  # no hub, no file: fall back to the defaults
            return {}
    cfg = json.loads(path.read_text())
    out = {}
    if "image_mean" in cfg and "image_std" in cfg:
        out.update(image_mean=tuple(cfg["image_mean"]), image_std=tuple(cfg["image_std"]))
    crop = cfg.get("crop_size") or cfg.get("size")
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge")
    if isinstance(crop, int):
        out["image_size"] = crop
    return out


def load_hf(source: str, *, model_id: str | None = None, **overrides) -> HFBackbone:
    """Load a transformers model by repo id or local folder (``config.json`` + weights)."""
    from transformers import AutoConfig, AutoModel

    model_id = model_id or f"hf:{source}"
    try:
        config = AutoConfig.from_pretrained(source)
        extra = {"mask_ratio": 0.0} if config.model_type == "vit_mae" else {}
        if config.model_type in EAGER_ONLY:
            extra["attn_implementation"] = "eager"
        model = AutoModel.from_pretrained(source, **extra)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SoapvitError(f"cannot load {model_id}: {first}") from err
    settings = _preprocessing(source)
    settings.update(overrides)
    return HFBackbone(model.eval(), model_id, **settings)


@register_source("hf")
def _load(name: str) -> Backbone:
    return load_hf(name)
