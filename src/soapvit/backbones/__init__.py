"""Backbones: one registry and one feature API for Hugging Face, timm and offline zoo models."""

from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, Features, RawOutput
from .registry import ModelNotFoundError, load, register_source

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "Features",
    "ModelNotFoundError",
    "RawOutput",
    "load",
    "register_source",
]
