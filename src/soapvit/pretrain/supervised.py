"""Supervised classification on the CLS token with DeiT-style augmentation (random resized
crop, flip, colour jitter in place of RandAugment, Mixup/CutMix, label smoothing)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backbones.base import IMAGENET_MEAN, IMAGENET_STD
from ..backbones.vit import ViTConfig, VisionTransformer
from ..data.augment import color_jitter, mix_labels, random_resized_crop
from ..data.transforms import normalize
from .objective import Objective


class Supervised(Objective):
    def __init__(
        self, config: ViTConfig, *, num_classes: int, crop_scale: tuple[float, float] = (0.08, 1.0),
        mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("supervised pre-training needs at least two classes")
        self.encoder = VisionTransformer(config)
        self.head = nn.Linear(config.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.num_classes, self.crop_scale = num_classes, tuple(crop_scale)
        self.mixup_alpha, self.cutmix_alpha, self.smoothing = mixup_alpha, cutmix_alpha, smoothing

    def loss(self, images: Tensor, labels: Tensor, gen: torch.Generator) -> Tensor:
        crops = random_resized_crop(images.float() / 255, self.encoder.config.image_size, gen, self.crop_scale)
        x = color_jitter(crops, gen)
        x, targets = mix_labels(x, labels, self.num_classes, gen, self.mixup_alpha, self.cutmix_alpha, smoothing=self.smoothing)
        logits = self.head(self.encoder(normalize(x, IMAGENET_MEAN, IMAGENET_STD))[:, 0]).float()
        return -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
