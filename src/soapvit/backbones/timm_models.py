"""``timm:<name>[@weights]``: timm Vision Transformers (optional extra: ``pip install soapvit[timm]``).

Every timm ViT with ``blocks``, ``norm`` and ``num_prefix_tokens``: ``VisionTransformer``
(``vit_*`` augreg/MAE/DINO/DINOv2 with or without registers, ``deit3_*``, ``vit_*_clip_*``,
``vit_*_siglip_*``), ``Eva`` (``eva02_*``, ``vit_*_rope_*``, ``vit_*_dinov3``) and ``NaFlexVit``.

- Block outputs are captured with forward hooks on ``model.blocks``; the tokens of the last
  block (final norm applied) equal timm's own ``forward_features``. ``norm=True`` applies
  ``model.norm``, which is an identity for models that pool with ``fc_norm`` (EVA-02 MIM,
  ``*_gap``), exactly as timm's ``forward_features`` does.
- Keys and attention maps are recomputed from each attention module's input (a forward
  pre-hook) and the module's own weights, as timm's attention computes them: the fused ``qkv``
  projection or separate ``q_proj``/``k_proj``, EVA's ``q_bias``/``k_bias``, ``q_norm``/``k_norm``,
  then RoPE on the patch tokens (prefix tokens unrotated), grouped-query heads expanded. EVA's
  attention calls ``F.linear`` with the ``qkv`` weights rather than the module, so nothing here
  hooks ``qkv`` itself. Keys are the ``k`` that enters the attention (RoPE applied), heads
  concatenated; ``TimmBackbone(..., keys_rope=False)`` gives them before the rotation.
- The input size defaults to the resolution the weights were trained at (``pretrained_cfg``),
  except the DINOv2 names (timm says 518 px), which default to 224 px as the SOAP authors use
  them. Models are created with ``dynamic_img_size=True`` where timm allows it, so any size that
  is a multiple of the patch (non-square included) works: absolute position embeddings are
  resampled from the trained grid and RoPE is computed for the input's grid.
- Weights: ``timm:NAME`` takes timm's pretrained weights from the Hugging Face hub, or from the
  local cache only when the hub is not reachable or ``HF_HUB_OFFLINE=1`` (fails in seconds with
  a hint when they are not cached); ``timm:NAME@path/to/weights.safetensors`` (or ``.pth``,
  ``.pt``, ``.bin``, loaded with ``weights_only=True``) uses a local file and never the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Container, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SoapvitError
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, RawOutput
from .registry import register_source

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
TRUE = ("1", "ON", "YES", "TRUE")  # what huggingface_hub reads as a true HF_HUB_OFFLINE
# names whose default input size is not timm's: the SOAP authors run DINOv2 at 224 px (timm: 518)
DEFAULT_SIZES = ((re.compile(r"dinov2"), 224),)
# MLP classes whose hidden activation is the output of ``act`` / of ``drop1`` (GLU: act(gate) * x)
ACT_MLPS = ("Mlp",)
GLU_MLPS = ("GluMlp", "SwiGLU")
# torch 2.x pairs with torchvision 0.(x + 15)
TORCHVISION_MINOR_OFFSET = 15


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _pairing_error(err: BaseException) -> SoapvitError:
    """The one-line error for a torchvision that cannot load beside the installed torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        vision = version("torchvision")
    except PackageNotFoundError:
        vision = "(unknown version)"
    base, _, build = torch.__version__.partition("+")
    major, minor = (base.split(".") + ["0"])[:2]
    if major == "2" and minor.isdigit():
        pair = f"0.{int(minor) + TORCHVISION_MINOR_OFFSET}.0"
    else:
        pair = "(the release made for it)"
    kind = "CPU" if build == "cpu" else (f"CUDA, {build}" if build.startswith("cu") else "PyPI's default")
    return SoapvitError(
        f"timm cannot import torchvision {vision} beside torch {torch.__version__} ({_first_line(err)}): torch "
        f"{base} pairs with torchvision {pair} of the same build ({kind}); install both from one index "
        f"(pip install torch=={base} torchvision=={pair}) or keep timm in an environment of its own")


def _import_timm():
    try:
        import timm
    except Exception as err:  # noqa: BLE001 - every way importing timm fails is one line
        text = str(err)
        if isinstance(err, ImportError) and err.name == "timm":
            raise SoapvitError("timm: models need the timm extra: pip install 'soapvit[timm]'") from None
        if "torchvision" in text or (isinstance(err, ImportError) and (err.name or "").startswith("torchvision")):
            # a torchvision built for another torch: "operator torchvision::nms does not exist"
            raise _pairing_error(err) from err
        raise SoapvitError(f"cannot import timm: {_first_line(err)}") from err
    return timm


def _default_image_size(model: nn.Module, name: str) -> int:
    """The resolution the weights were trained at (DINOv2: 224, see ``DEFAULT_SIZES``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = cfg.get("architecture") or name.split("@")[0]
    for pattern, size in DEFAULT_SIZES:
        if pattern.search(architecture):
            return size
    size = cfg.get("input_size")
    if size:
        return int(size[-1])
    return 224


def _patch_size(model: nn.Module) -> int:
    embed = getattr(model, "patch_embed", None) or getattr(model, "embeds", None)  # NaFlexVit: embeds
    patch = getattr(embed, "patch_size", None)
    if patch is None:
        raise SoapvitError(f"{type(model).__name__} has no patch_embed.patch_size (nor embeds.patch_size)")
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if patch[0] != patch[1]:
        raise SoapvitError(f"non-square patches {patch} are not supported")
    return int(patch[0])


class _AttentionInput:
    """What a forward pre-hook saw entering an attention module: its input, RoPE and mask."""

    __slots__ = ("x", "rope", "mask")

    def __init__(self, x: Tensor, rope: Tensor | None, mask: Tensor | None) -> None:
        self.x, self.rope, self.mask = x, rope, mask


def _capture_attention_input(store: dict, b: int):
    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        rope = kwargs.get("rope", args[1] if len(args) > 1 else None)
        mask = kwargs.get("attn_mask")
        store[b] = _AttentionInput(x, rope, mask)
    return hook


def attention_qk(attn: nn.Module, x: Tensor, rope: Tensor | None = None, *, apply_rope: bool = True
                 ) -> tuple[Tensor, Tensor]:
    """``q`` ``(B, heads, N, d)`` and ``k`` ``(B, kv_heads, N, d)`` as a timm attention module
    computes them from its input ``x``: projections, q/k norms, RoPE on the patch tokens."""
    batch, n, _ = x.shape
    heads = int(attn.num_heads)
    kv_heads = int(getattr(attn, "num_kv_heads", heads) or heads)
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        bias = qkv.bias
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is not None:  # EVA: learned q and v biases, a zero k bias, applied by F.linear
            k_bias = getattr(attn, "k_bias", None)
            bias = torch.cat((q_bias, torch.zeros_like(q_bias) if k_bias is None else k_bias, attn.v_bias))
        out = F.linear(x, qkv.weight, bias).reshape(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = out[0], out[1]
    elif isinstance(getattr(attn, "q_proj", None), nn.Linear) and isinstance(getattr(attn, "k_proj", None), nn.Linear):
        q = attn.q_proj(x).reshape(batch, n, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(batch, n, kv_heads, -1).transpose(1, 2)
    else:
        raise SoapvitError(f"{type(attn).__name__} has neither a qkv projection nor q_proj/k_proj: "
                           "keys and attention maps are not available for it")
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    if rope is not None and apply_rope:
        from timm.layers import apply_rot_embed_cat

        npt = int(getattr(attn, "num_prefix_tokens", 0))
        half = bool(getattr(attn, "rotate_half", False))
        dtype = k.dtype
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).to(dtype)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).to(dtype)
    return q, k


def attention_probabilities(attn: nn.Module, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """``softmax(q kᵀ · scale)`` ``(B, heads, N, N)``, grouped-query key heads expanded."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = float(getattr(attn, "scale", q.shape[-1] ** -0.5))
    scores = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)


class TimmBackbone(Backbone):
    """A timm Vision Transformer (``blocks``, ``norm``, ``num_prefix_tokens``, ``patch_embed``)."""

    def __init__(self, model: nn.Module, model_id: str, *, image_size: int | None = None,
                 keys_rope: bool = True) -> None:
        for attr in ("blocks", "norm", "num_prefix_tokens", "embed_dim", "forward_features"):
            if not hasattr(model, attr):
                raise SoapvitError(f"{model_id} is not a timm Vision Transformer (it has no .{attr})")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        name = model_id.partition(":")[2] or model_id
        attn = getattr(model.blocks[-1], "attn", None)
        heads = getattr(attn, "num_heads", None) or getattr(model.blocks[-1], "num_heads", 1)
        super().__init__(model_id, patch_size=_patch_size(model), embed_dim=model.embed_dim,
                         num_blocks=len(model.blocks), num_heads=heads, num_prefix_tokens=model.num_prefix_tokens,
                         image_size=image_size or _default_image_size(model, name),
                         image_mean=cfg.get("mean") or IMAGENET_MEAN, image_std=cfg.get("std") or IMAGENET_STD)
        self.model = model
        self.keys_rope = keys_rope

    def block_modules(self):
        return self.model.blocks

    def mlp_activation_modules(self) -> list[nn.Module]:
        """Per block, the module whose output is the MLP's hidden activation: ``mlp.act`` for
        timm's ``Mlp``; for the GLU MLPs (EVA-02's SwiGLU, packed or not) ``mlp.drop1``, whose
        output ``act(gate) * x`` feeds ``mlp.norm`` and ``fc2`` (``act`` alone is the gate)."""
        out = []
        for i, block in enumerate(self.model.blocks):
            mlp = getattr(block, "mlp", None)
            kind = type(mlp).__name__
            if kind in ACT_MLPS and isinstance(getattr(mlp, "act", None), nn.Module):
                out.append(mlp.act)
            elif kind in GLU_MLPS and isinstance(getattr(mlp, "drop1", None), nn.Module):
                out.append(mlp.drop1)
            else:
                raise SoapvitError(
                    f"{self.model_id}: block {i}'s MLP ({kind}) is not one whose hidden activation is known "
                    f"({', '.join(ACT_MLPS + GLU_MLPS)}); test-time registers need it")
        return out

    def _attention(self, b: int) -> nn.Module:
        attn = getattr(self.model.blocks[b], "attn", None)
        if attn is None or not hasattr(attn, "num_heads"):
            raise SoapvitError(f"{self.model_id}: block {b} ({type(self.model.blocks[b]).__name__}) has no "
                               "attention module with num_heads: keys and attention maps are not available")
        return attn

    def _run(self, pixels: Tensor, blocks, norm: Container[int], keys: bool, attentions, edits) -> RawOutput:
        captured: dict[int, Tensor] = {}
        inputs: dict[int, _AttentionInput] = {}
        last = self.num_blocks - 1
        attn_blocks = sorted({*attentions, *([last] if keys else [])})
        modules = {b: self._attention(b) for b in attn_blocks}
        # edit hooks first: forward hooks run in registration order, so the capture sees the edit
        handles = [self.model.blocks[b].register_forward_hook(lambda _m, _i, out, fn=fn: fn(out))
                   for b, fn in edits.items()]
        handles += [self.model.blocks[b].register_forward_hook(
            lambda _m, _i, out, b=b: captured.__setitem__(b, out)) for b in blocks]
        handles += [modules[b].register_forward_pre_hook(_capture_attention_input(inputs, b), with_kwargs=True)
                    for b in attn_blocks]
        try:
            self.model.forward_features(pixels)
        finally:
            for h in handles:
                h.remove()
        hidden = {b: self.model.norm(captured[b]) if b in norm else captured[b] for b in blocks}
        key_out = None
        attn = {}
        for b in attn_blocks:
            seen = inputs[b]
            if b in attentions:
                q, k = attention_qk(modules[b], seen.x, seen.rope)
                attn[b] = attention_probabilities(modules[b], q, k, seen.mask)
            if keys and b == last:
                if b not in attentions or not self.keys_rope:
                    _, k = attention_qk(modules[b], seen.x, seen.rope, apply_rope=self.keys_rope)
                key_out = k.transpose(1, 2).flatten(2)  # (B, N, kv_heads * d)
        return RawOutput(hidden=hidden, keys=key_out, attentions=attn)


# -- loading ------------------------------------------------------------------------------------
def split_weights(name: str) -> tuple[str, Path | None]:
    """``NAME@path/to/weights.safetensors`` → (``NAME``, path); a name without a weights file
    (``hf-hub:org/repo@revision`` keeps its revision) → (name, None)."""
    model, sep, path = name.rpartition("@")
    if not sep or not path.lower().endswith(WEIGHT_SUFFIXES):
        if sep and not model.startswith("hf-hub:"):
            raise SoapvitError(f"timm:{name}: the weights after '@' must be a file ending in "
                               f"{', '.join(WEIGHT_SUFFIXES)}")
        return name, None
    return model, Path(path).expanduser()


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """A local weights file as a flat state dict: safetensors, or ``torch.load(weights_only=True)``
    (the usual wrappers ``state_dict``/``model``/``state_dict_ema``/``model_ema`` and a
    ``module.`` prefix are removed)."""
    if not path.is_file():
        raise SoapvitError(f"weights file {path} does not exist")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it, a truncated file, not a weights file at all
        raise SoapvitError(f"cannot read weights from {path} (weights_only loading): {_first_line(err)}") from err
    if isinstance(state, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise SoapvitError(f"{path} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """While loading: the Hugging Face hub in offline mode (``HF_HUB_OFFLINE=1``, which
    huggingface_hub reads at import, so its constant is set too), restored afterwards."""
    if not offline:
        yield
        return
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    saved = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


@contextlib.contextmanager
def _missing_keys() -> Iterator[list[str]]:
    """The keys timm reports missing while it loads pretrained weights (it logs them at INFO)."""
    missing: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.match(r"Missing keys \((.*)\) discovered", record.getMessage())
            if found:
                missing.extend(k.strip() for k in found.group(1).split(","))

    logger = logging.getLogger("timm.models._builder")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield missing
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _create(timm, name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` with ``dynamic_img_size=True`` where the model takes it."""
    try:
        return timm.create_model(name, num_classes=0, dynamic_img_size=True, **kwargs)
    except TypeError as err:
        if "dynamic_img_size" not in str(err):
            raise
        return timm.create_model(name, num_classes=0, **kwargs)


def _offline_hint(name: str) -> str:
    return (f"cannot load timm:{name}: the Hugging Face hub is not reachable (or HF_HUB_OFFLINE=1) and its weights "
            "are not in the local cache; download them where the hub is reachable (python -c \"import timm; "
            f"timm.create_model('{name}', pretrained=True)\") and copy the cache ($HF_HOME), or pass a local file: "
            f"timm:{name}@/path/to/weights.safetensors")


def load_timm_model(name: str, weights: Path | None = None) -> nn.Module:
    """The timm model ``name`` in eval mode with its pretrained weights (hub, local cache, or
    the local file ``weights``)."""
    timm = _import_timm()
    if not timm.is_model(name.split("@")[0]) and not name.startswith(("hf-hub:", "local-dir:")):
        raise SoapvitError(f"unknown timm model {name!r} (timm.list_models('*vit*') lists them)")
    try:
        if weights is not None:
            state = load_state_dict(weights)
            with _missing_keys() as missing:  # timm loads non-strictly when it drops a classifier
                model = _create(timm, name, pretrained=True, pretrained_cfg_overlay={"state_dict": state})
            if missing:
                raise SoapvitError(f"{weights} lacks {len(missing)} tensor(s) of timm:{name} "
                                   f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})")
            for cfg in (getattr(model, "pretrained_cfg", None), getattr(model, "default_cfg", None)):
                if isinstance(cfg, dict):
                    cfg.pop("state_dict", None)  # timm keeps the overlay: do not hold the weights twice
            return model.eval()
        from .hf import hub_reachable

        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE or not hub_reachable()
        with hub_offline(offline):
            try:
                return _create(timm, name, pretrained=True).eval()
            except (OSError, ValueError, RuntimeError) as err:
                if offline and "size mismatch" not in str(err):
                    raise SoapvitError(_offline_hint(name)) from err
                raise
    except SoapvitError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as err:
        where = f" with weights {weights}" if weights is not None else ""
        raise SoapvitError(f"cannot load timm:{name}{where}: {_first_line(err)}") from err


@register_source("timm")
def load_timm(name: str) -> Backbone:
    model_name, weights = split_weights(name)
    model = load_timm_model(model_name, weights)
    return TimmBackbone(model, f"timm:{name}")
