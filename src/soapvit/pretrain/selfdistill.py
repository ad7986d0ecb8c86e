"""DINO self-distillation (student/EMA teacher, centring and sharpening, multi-crop) and iBOT
(DINO plus masked patch-token distillation: the student sees masked global crops with mask
tokens inside the encoder and predicts the teacher's patch distributions)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import IMAGENET_MEAN, IMAGENET_STD
from ..backbones.vit import ViTConfig, VisionTransformer
from ..data.augment import color_jitter, random_grayscale, random_resized_crop
from ..data.transforms import normalize
from .masking import block_mask
from .objective import Objective


class ProjectionHead(nn.Module):
    """DINO head: 3-layer MLP → L2-normalised bottleneck → weight-normalised prototypes
    (norm of the last layer fixed to 1)."""

    def __init__(self, dim: int, out_dim: int, hidden: int = 256, bottleneck: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


def distill(teacher_logits: Tensor, student_logits: Tensor, center: Tensor, t_temp: float, s_temp: float) -> Tensor:
    """Cross-entropy of sharpened, centred teacher probabilities to student log-probabilities,
    summed over prototypes (per row)."""
    targets = torch.softmax((teacher_logits - center) / t_temp, dim=-1)
    return -(targets * torch.log_softmax(student_logits / s_temp, dim=-1)).sum(-1)


class DINO(Objective):
    """Two global crops (teacher and student) and ``local_crops`` small crops (student only)."""

    def __init__(
        self, config: ViTConfig, *, out_dim: int = 1024, local_crops: int = 4, local_size: int = 32,
        global_scale: tuple[float, float] = (0.35, 1.0), local_scale: tuple[float, float] = (0.1, 0.35),
        teacher_temp: float = 0.04, student_temp: float = 0.1, center_momentum: float = 0.9,
        momentum: float = 0.996, patch_loss: bool = False, mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_prob: float = 0.5,
    ) -> None:
        super().__init__()
        self.encoder = VisionTransformer(config)
        self.head = ProjectionHead(config.embed_dim, out_dim)
        self.teacher = copy.deepcopy(self.encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.local_crops, self.local_size = local_crops, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.teacher_temp, self.student_temp = teacher_temp, student_temp
        self.center_momentum, self.base_momentum = center_momentum, momentum
        self.patch_loss = patch_loss
        if patch_loss:
            self.register_buffer("patch_center", torch.zeros(1, out_dim))
            self.mask_token = nn.Parameter(torch.zeros(config.embed_dim))
            nn.init.normal_(self.mask_token, std=0.02)
            self.mask_ratio, self.mask_prob = tuple(mask_ratio), mask_prob

    def _view(self, x: Tensor, size: int, scale, gen: torch.Generator) -> Tensor:
        x = random_resized_crop(x, size, gen, scale)
        return normalize(random_grayscale(color_jitter(x, gen), gen), IMAGENET_MEAN, IMAGENET_STD)

    def _masks(self, batch: int, gen: torch.Generator, device) -> Tensor:
        """iBOT masks for ``batch`` global crops: block-wise, ratio drawn per batch, applied to
        a random ``mask_prob`` share of the crops."""
        grid = (self.encoder.config.grid, self.encoder.config.grid)
        ratio = float(torch.empty(1).uniform_(*self.mask_ratio, generator=gen))
        masks = block_mask(batch, grid, ratio, gen)
        keep = torch.rand(batch, generator=gen) < self.mask_prob
        return (masks & keep.unsqueeze(1)).to(device)

    def loss(self, images: Tensor, labels: Tensor, gen: torch.Generator) -> Tensor:
        x = images.float() / 255
        b, p = x.shape[0], self.encoder.config.num_prefix_tokens
        globals_ = torch.cat([self._view(x, self.encoder.config.image_size, self.global_scale, gen) for _ in range(2)])
        locals_ = [self._view(x, self.local_size, self.local_scale, gen) for _ in range(self.local_crops)]
        with torch.no_grad():
            t_seq = self.teacher(globals_)
            t_cls = self.teacher_head(t_seq[:, 0]).float()
        mask = self._masks(2 * b, gen, x.device) if self.patch_loss else None
        s_seq = self.encoder(globals_, mask, getattr(self, "mask_token", None))
        s_cls = [self.head(s_seq[:, 0]).float()]
        if locals_:
            s_cls.append(self.head(self.encoder(torch.cat(locals_))[:, 0]).float())
        s_cls = torch.cat(s_cls).chunk(2 + self.local_crops)
        t_chunks = t_cls.chunk(2)
        terms = [
            distill(t, s, self.center, self.teacher_temp, self.student_temp).mean()
            for i, t in enumerate(t_chunks) for j, s in enumerate(s_cls) if i != j
        ]
        total = torch.stack(terms).mean()
        if self.patch_loss:
            total = total + self._patch_term(t_seq[:, p:], s_seq[:, p:], mask)
        with torch.no_grad():
            self.center.mul_(self.center_momentum).add_(t_cls.mean(0, keepdim=True), alpha=1 - self.center_momentum)
        return total

    def _patch_term(self, t_patches: Tensor, s_patches: Tensor, mask: Tensor) -> Tensor:
        """iBOT masked-patch distillation: teacher (unmasked) vs student (masked) patch tokens of
        the same crop, averaged over masked patches; patch centre updated by EMA."""
        if not mask.any():
            return s_patches.sum() * 0.0
        with torch.no_grad():
            t_logits = self.teacher_head(t_patches[mask]).float()
        s_logits = self.head(s_patches[mask]).float()
        term = distill(t_logits, s_logits, self.patch_center, self.teacher_temp, self.student_temp).mean()
        with torch.no_grad():
            self.patch_center.mul_(self.center_momentum).add_(t_logits.mean(0, keepdim=True), alpha=1 - self.center_momentum)
        return term

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """EMA teacher; momentum follows a cosine from ``momentum`` to 1."""
        m = 1 - (1 - self.base_momentum) * (math.cos(math.pi * progress) + 1) / 2
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1 - m)
        for t, s in zip(self.teacher_head.parameters(), self.head.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1 - m)

    def exported_encoder(self) -> VisionTransformer:
        return self.teacher
