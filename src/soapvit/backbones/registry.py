"""One registry for every model source: ``"<source>:<name>"`` → :class:`Backbone`.

Sources register a loader with :func:`register_source`; their modules are imported only when a
model of that source is loaded, so ``import soapvit`` never imports transformers, timm or onnx.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..errors import SoapvitError
from .base import Backbone

# source prefix → module that registers it on import
_SOURCE_MODULES = {
    "hf": "soapvit.backbones.hf",
    "timm": "soapvit.backbones.timm_models",
    "zoo": "soapvit.backbones.zoo",
}
_LOADERS: dict[str, Callable[[str], Backbone]] = {}


class ModelNotFoundError(SoapvitError):
    """A model id that no source can load."""


def register_source(prefix: str) -> Callable[[Callable[[str], Backbone]], Callable[[str], Backbone]]:
    """Decorator: register ``loader(name) -> Backbone`` for ids ``"<prefix>:<name>"``."""

    def deco(loader: Callable[[str], Backbone]) -> Callable[[str], Backbone]:
        _LOADERS[prefix] = loader
        return loader

    return deco


def load(model_id: str, device: str | None = None) -> Backbone:
    """Load a backbone by id (``hf:<repo or dir>``, ``timm:<name>``, ``zoo:<name>``), in eval
    mode, on ``device`` if given."""
    prefix, sep, name = model_id.partition(":")
    if not sep or not name:
        raise ModelNotFoundError(
            f"model id {model_id!r} must look like 'hf:<repo or dir>', 'timm:<name>' or 'zoo:<name>'"
        )
    if prefix not in _LOADERS:
        if prefix not in _SOURCE_MODULES:
            raise ModelNotFoundError(
                f"unknown model source {prefix!r} in {model_id!r}; known: {', '.join(sorted(_SOURCE_MODULES))}"
            )
        importlib.import_module(_SOURCE_MODULES[prefix])
    backbone = _LOADERS[prefix](name)
    backbone.eval()
    if device is not None:
        backbone.to(device)
    return backbone
