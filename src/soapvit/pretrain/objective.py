"""What every pre-training objective provides to the trainer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backbones.vit import VisionTransformer


class Objective(nn.Module):
    """A trainable wrapper around one :class:`VisionTransformer` (``self.encoder``).

    :meth:`loss` takes a batch of uint8 images ``(B, 3, H, W)`` (augmentation happens inside,
    on the images' device) with their labels and a seeded generator; :meth:`after_step` runs
    after each optimiser step (EMA teachers); :meth:`exported_encoder` is the network shipped
    as a backbone (the EMA teacher for self-distillation)."""

    encoder: VisionTransformer

    def loss(self, images: Tensor, labels: Tensor, gen: torch.Generator) -> Tensor:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """``progress`` ∈ [0, 1]: fraction of the run done."""

    def exported_encoder(self) -> VisionTransformer:
        return self.encoder
