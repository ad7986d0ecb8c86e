"""``hf:<repo id or local folder>``: Vision Transformers from Hugging Face transformers.

One adapter for every supported family (ViT/DeiT, ViTMAE, Dinov2, Dinov2WithRegisters, DINOv3
ViT, I-JEPA, BEiT, Data2Vec-Vision, CLIPVisionModel). Block outputs and the last block's keys
are captured with forward hooks on the model's own layer and key-projection modules, so one
forward pass serves any set of blocks. Conventions:

- ``norm=True`` applies the module that turns the last block's output into the model's
  ``last_hidden_state`` (``layernorm``/``norm``; an identity for BEiT-style models with mean
  pooling, whose final norm acts on the pooled vector only); for CLIP, whose ``last_hidden_state``
  is un-normalised, it is ``post_layernorm`` applied to every token, as timm's CLIP ViTs do;
- keys are the key projection's output, heads concatenated (before RoPE for DINOv3);
- ViTMAE runs with ``mask_ratio=0`` and the identity shuffle, so its tokens are in patch order;
- other input sizes work: ``interpolate_pos_encoding`` is passed where the model takes it
  (Dinov2 interpolates always, DINOv3 uses RoPE).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import json
import re
import warnings
from collections.abc import Container, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import SoapvitError
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, RawOutput
from .registry import register_source

SUPPORTED = (
    "vit", "deit", "vit_mae", "dinov2", "dinov2_with_registers", "dinov3_vit", "ijepa", "beit",
    "data2vec-vision", "clip_vision_model",
)
NO_CLS = ("ijepa",)
WITH_DISTILLATION_TOKEN = ("deit",)
# where the transformer blocks live, across families and transformers versions
LAYER_PATHS = ("layers", "encoder.layer", "encoder.layers", "model.layer", "model.layers",
               "vision_model.encoder.layers")
FINAL_NORMS = ("layernorm", "norm", "post_layernorm", "vision_model.post_layernorm")
KEY_MODULE = re.compile(r"(^|\.)(key|k_proj)$")
# the MLP's non-linearity, across families and transformers versions; a gated MLP has no module
# whose output is its hidden activation
MLP_OWNERS = ("mlp", "intermediate")
ACTIVATION_NAMES = ("activation_fn", "activation", "act_fn", "act", "intermediate_act_fn")
GATED_NAMES = ("gate_proj", "weights_in")


def _first(value) -> int:
    return int(value if isinstance(value, int) else value[0])


def _blocks(model: nn.Module, depth: int) -> nn.ModuleList:
    for path in LAYER_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise SoapvitError(f"cannot find the {depth} transformer blocks of {type(model).__name__}")


def _final_norm(model: nn.Module) -> nn.Module:
    for path in FINAL_NORMS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return nn.Identity()


def _key_projection(block: nn.Module) -> nn.Linear | None:
    for name, module in block.named_modules():
        if KEY_MODULE.search(name) and isinstance(module, nn.Linear):
            return module
    return None


def _mlp_activation(block: nn.Module, index: int) -> nn.Module:
    for owner in (getattr(block, name, None) for name in MLP_OWNERS):
        if owner is None:
            continue
        if any(hasattr(owner, name) for name in GATED_NAMES):
            raise SoapvitError(f"block {index} has a gated MLP ({type(owner).__name__}): no module outputs its "
                               "hidden activation")
        for name in ACTIVATION_NAMES:
            act = getattr(owner, name, None)
            if act is None:
                continue
            if not isinstance(act, nn.Module):
                raise SoapvitError(f"block {index}: the MLP activation {type(owner).__name__}.{name} is a plain "
                                   "function, not a module, so it cannot be hooked")
            return act
    raise SoapvitError(f"cannot find the MLP activation of block {index} ({type(block).__name__})")


def _edit_output(out, fn):
    """Apply ``fn`` to a block's hidden states, whether the block returns a tensor or a tuple."""
    return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (``$HF_ENDPOINT`` or huggingface.co) opens within
    ``timeout``: without it, loading uses the local cache only instead of retrying for minutes."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def num_prefix_tokens(config) -> int:
    """CLS (absent in I-JEPA) + registers + DeiT's distillation token."""
    prefix = 0 if config.model_type in NO_CLS else 1
    prefix += int(getattr(config, "num_register_tokens", 0) or 0)
    prefix += config.model_type in WITH_DISTILLATION_TOKEN
    return prefix


class HFBackbone(Backbone):
    """A transformers vision model behind the :class:`Backbone` API."""

    def __init__(self, model: nn.Module, model_id: str, *, image_size: int | None = None,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD) -> None:
        config = model.config
        if config.model_type not in SUPPORTED:
            raise SoapvitError(
                f"{model_id}: model type {config.model_type!r} is not supported ({', '.join(SUPPORTED)})"
            )
        super().__init__(model_id, patch_size=_first(config.patch_size), embed_dim=config.hidden_size,
                         num_blocks=config.num_hidden_layers, num_heads=config.num_attention_heads,
                         num_prefix_tokens=num_prefix_tokens(config),
                         image_size=image_size or _first(config.image_size),
                         image_mean=image_mean, image_std=image_std)
        self.model = model
        self.blocks = _blocks(model, config.num_hidden_layers)
        self.final_norm = _final_norm(model)
        self.last_keys = _key_projection(self.blocks[-1])
        params = inspect.signature(model.forward).parameters
        self._interpolates = "interpolate_pos_encoding" in params

    def _forward_kwargs(self, pixels: Tensor) -> dict:
        kwargs = {"interpolate_pos_encoding": True} if self._interpolates else {}
        if self.model.config.model_type == "vit_mae":  # identity shuffle: patches stay in order
            n = (pixels.shape[-2] // self.patch_size) * (pixels.shape[-1] // self.patch_size)
            kwargs["noise"] = torch.arange(n, device=pixels.device, dtype=torch.float32).expand(pixels.shape[0], n)
        return kwargs

    def _set_attention(self, implementation: str | None) -> str | None:
        """Switch the attention implementation; returns the previous one."""
        previous = getattr(self.model.config, "_attn_implementation", None)
        if implementation is not None and implementation != previous:
            if hasattr(self.model, "set_attn_implementation"):
                self.model.set_attn_implementation(implementation)
            else:  # transformers 4.x
                self.model.config._attn_implementation = implementation
        return previous

    def block_modules(self):
        return self.blocks

    def mlp_activation_modules(self):
        try:
            acts = [_mlp_activation(block, i) for i, block in enumerate(self.blocks)]
        except SoapvitError as err:
            raise SoapvitError(f"{self.model_id}: {err}") from None
        if len({id(a) for a in acts}) < len(acts):
            raise SoapvitError(f"{self.model_id}: blocks share one MLP activation module (not hookable per block)")
        return acts

    def _run(self, pixels: Tensor, blocks, norm: Container[int], keys: bool, attentions, edits) -> RawOutput:
        captured: dict[int, Tensor] = {}
        key_out: list[Tensor] = []
        # edit hooks first: forward hooks run in registration order, so the capture sees the edit
        handles = [self.blocks[b].register_forward_hook(lambda _m, _i, out, fn=fn: _edit_output(out, fn))
                   for b, fn in edits.items()]
        handles += [
            self.blocks[b].register_forward_hook(
                lambda _m, _i, out, b=b: captured.__setitem__(b, out[0] if isinstance(out, tuple) else out))
            for b in blocks
        ]
        if keys:
            if self.last_keys is None:
                raise SoapvitError(f"{self.model_id}: no key projection found in the last block")
            handles.append(self.last_keys.register_forward_hook(lambda _m, _i, out: key_out.append(out)))
        want_attentions = bool(attentions)
        previous = self._set_attention("eager" if want_attentions else None)
        try:
            out = self.model(pixel_values=pixels, output_attentions=want_attentions, **self._forward_kwargs(pixels))
        finally:
            for handle in handles:
                handle.remove()
            self._set_attention(previous)
        hidden = {b: self.final_norm(captured[b]) if b in norm else captured[b] for b in blocks}
        attn = {b: out.attentions[b] for b in attentions}
        return RawOutput(hidden=hidden, keys=key_out[0] if keys else None, attentions=attn)


def preprocessing(source: str) -> dict:
    """``image_mean``/``image_std``/``image_size`` from the checkpoint's
    ``preprocessor_config.json`` when there is one (local folder, else the hub's cache); without
    one, a warning says what is assumed."""
    assumed = (f"{source}: no preprocessor_config.json{{}}; assuming the ImageNet mean/std and the "
               "config's image size")
    path = Path(source) / "preprocessor_config.json"
    if not Path(source).is_dir():
        try:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(source, "preprocessor_config.json")
            path = Path(cached if isinstance(cached, str) else hf_hub_download(source, "preprocessor_config.json"))
        except Exception as err:  # no hub, no file: the defaults, said
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(assumed.format(f" ({first})"), stacklevel=2)
            return {}
    if not path.is_file():
        warnings.warn(assumed.format(""), stacklevel=2)
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SoapvitError(f"{path} is not valid JSON: {err}") from err
    out = {}
    if "image_mean" in cfg and "image_std" in cfg:
        out.update(image_mean=tuple(cfg["image_mean"]), image_std=tuple(cfg["image_std"]))
    crop = cfg.get("crop_size") if cfg.get("do_center_crop", True) else None
    crop = crop or cfg.get("size")
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge")
    if isinstance(crop, int):
        out["image_size"] = crop
    return out


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).exists()


def _attention_option(auto_model, config) -> dict:
    """Eager attention from the start for models that cannot switch it per call (Data2Vec-Vision
    in transformers 5), so that attention maps stay available."""
    try:
        switchable = auto_model._model_mapping[type(config)]._can_set_attn_implementation()
    except (AttributeError, KeyError):
        return {}
    return {} if switchable else {"attn_implementation": "eager"}


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _disagreement(missing, mismatched) -> str:
    if missing:
        return f"{len(missing)} tensor(s) the config needs are not in the weights, e.g. {missing[0]}"
    return f"{len(mismatched)} tensor(s) have another size than the config gives, e.g. {mismatched[0]}"


def load_hf(source: str, *, model_id: str | None = None) -> HFBackbone:
    """Load a transformers model by repo id or local folder (``config.json`` + weights)."""
    model_id = model_id or f"hf:{source}"
    if _looks_like_path(source):
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            raise SoapvitError(f"cannot load {model_id}: {folder} is not a folder with a config.json")
        source = str(folder)
    from transformers import AutoConfig, AutoModel

    offline = not _looks_like_path(source) and (os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable())
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
        if config.model_type not in SUPPORTED:
            raise SoapvitError(
                f"{model_id}: model type {config.model_type!r} is not supported ({', '.join(SUPPORTED)})"
            )
        extra = {"mask_ratio": 0.0} if config.model_type == "vit_mae" else {}
        with _quiet_transformers():  # its load report is a table of every tensor: one line says it here
            model, info = AutoModel.from_pretrained(source, local_files_only=offline, output_loading_info=True,
                                                    **extra, **_attention_option(AutoModel, config))
        missing = [k for k in info.get("missing_keys", ()) if "pooler" not in k]
        if missing or info.get("mismatched_keys"):
            raise SoapvitError(f"cannot load {model_id}: its config.json disagrees with its weights "
                               f"({_disagreement(missing, info.get('mismatched_keys'))})")
    except RuntimeError as err:  # transformers refuses tensors of another size than the config gives
        if "mismatch" not in str(err):
            raise
        raise SoapvitError(f"cannot load {model_id}: its config.json disagrees with its weights (tensor sizes "
                           "differ from those the config gives)") from None
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, SoapvitError):
            raise
        if offline:
            raise SoapvitError(
                f"cannot load {model_id}: the Hugging Face hub is not reachable (or HF_HUB_OFFLINE=1) and the model "
                "is not in the local cache; download it where the hub is reachable, or pass a local folder "
                "(hf:/path/to/model with config.json and weights)") from err
        message = str(err).strip()
        first = message.splitlines()[0] if message else type(err).__name__
        raise SoapvitError(f"cannot load {model_id}: {first}") from err
    return HFBackbone(model.eval(), model_id, **preprocessing(source))


@register_source("hf")
def _load(name: str) -> Backbone:
    return load_hf(name)
