"""Masked image modelling with three encoders sharing one ViT, one masking and one target code:
:class:`SimMIM` (mask tokens inside the encoder, BEiT/SimMIM/MaskFeat), :class:`MAE` (visible
tokens only plus a light decoder) and :class:`SemanticMIM` (proxy architecture, seed paper §3.3:
per layer a compression block over [visible image, proxy] tokens and a reconstruction block in
which mask tokens cross-attend to [proxies of the next layer, mask tokens]). The loss is the
mean squared error on masked patches only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import IMAGENET_MEAN, IMAGENET_STD
from ..backbones.vit import Block, ViTConfig, VisionTransformer, resample_position_embedding
from ..data.augment import random_resized_crop
from ..data.transforms import normalize
from .masking import make_mask
from .objective import Objective
from .targets import make_targets, target_dim


def gather_tokens(tokens: Tensor, mask: Tensor, keep: bool) -> Tensor:
    """Tokens ``(B, N, D)`` where ``mask == keep``, as ``(B, K, D)`` (same count per image)."""
    sel = mask if keep else ~mask
    return tokens[sel].reshape(tokens.shape[0], -1, tokens.shape[-1])


class MaskedImageModel(Objective):
    """Shared MIM loop: crop + flip, mask, predict the masked patches, MSE to the target."""

    def __init__(
        self, config: ViTConfig, *, target: str, masking: str, mask_ratio: float,
        crop_scale: tuple[float, float] = (0.35, 1.0),
    ) -> None:
        super().__init__()
        self.encoder = VisionTransformer(config)
        self.target, self.masking, self.mask_ratio = target, masking, mask_ratio
        self.crop_scale = tuple(crop_scale)
        self.target_dim = target_dim(target, config.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(config.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def predict_masked(self, pixels: Tensor, mask: Tensor) -> Tensor:
        """Predictions for the masked patches ``(B, K, target_dim)`` in patch order."""
        raise NotImplementedError

    def loss(self, images: Tensor, labels: Tensor, gen: torch.Generator) -> Tensor:
        cfg = self.encoder.config
        crops = random_resized_crop(images.float() / 255, cfg.image_size, gen, self.crop_scale)
        pixels = normalize(crops, IMAGENET_MEAN, IMAGENET_STD)
        mask = make_mask(self.masking, pixels.shape[0], (cfg.grid, cfg.grid), self.mask_ratio, gen).to(pixels.device)
        with torch.no_grad():
            target = gather_tokens(make_targets(self.target, pixels.float(), cfg.patch_size), mask, keep=True)
        return F.mse_loss(self.predict_masked(pixels, mask).float(), target)


class SimMIM(MaskedImageModel):
    """Mask tokens replace the masked patch embeddings inside the encoder; a linear head on
    the final-norm patch tokens predicts the target."""

    def __init__(self, config: ViTConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.head = nn.Linear(config.embed_dim, self.target_dim)

    def predict_masked(self, pixels: Tensor, mask: Tensor) -> Tensor:
        seq = self.encoder(pixels, mask, self.mask_token)
        patches = seq[:, self.encoder.config.num_prefix_tokens :]
        return self.head(gather_tokens(patches, mask, keep=True))


class MAE(MaskedImageModel):
    """The encoder sees prefix + visible tokens; a light decoder (own width, learned position
    embedding) fills in mask tokens and predicts the target."""

    def __init__(self, config: ViTConfig, *, decoder_dim: int = 96, decoder_depth: int = 2, decoder_heads: int = 3, **kwargs) -> None:
        super().__init__(config, **kwargs)
        del self.mask_token  # MAE's mask token lives in the decoder
        self.decoder_embed = nn.Linear(config.embed_dim, decoder_dim)
        self.decoder_mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, config.grid**2, decoder_dim))
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, config.mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.head = nn.Linear(decoder_dim, self.target_dim)
        nn.init.normal_(self.decoder_mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def predict_masked(self, pixels: Tensor, mask: Tensor) -> Tensor:
        vit = self.encoder
        visible = gather_tokens(vit.embed_patches(pixels), mask, keep=False)
        x = torch.cat([vit.prefix(visible.shape[0]), visible], dim=1)
        for block in vit.blocks:
            x = block(x)
        x = self.decoder_embed(vit.norm(x))
        p = vit.config.num_prefix_tokens
        full = self.decoder_mask_token.to(x.dtype).expand(mask.shape[0], mask.shape[1], -1)
        full = full.masked_scatter((~mask).unsqueeze(-1), x[:, p:])  # visible tokens in patch order
        x = torch.cat([x[:, :p], full + self.decoder_pos], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.head(gather_tokens(self.decoder_norm(x)[:, p:], mask, keep=True))


class SemanticMIM(MaskedImageModel):
    """Proxy architecture. The encoder's prefix tokens are the proxies (``num_prefix_tokens``,
    8 by default); its blocks are the compression blocks; ``reconstruction`` blocks (one per
    layer, discarded after training) update the mask tokens, which start as mask token +
    position embedding and never see image tokens. The last reconstruction block reads the
    proxies through the encoder's final norm, as the exported backbone outputs them, so that
    norm is trained (MAE's decoder reads the encoder's final norm likewise)."""

    def __init__(self, config: ViTConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.reconstruction = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio, config.qkv_bias) for _ in range(config.depth)
        )
        self.decoder_norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.head = nn.Linear(config.embed_dim, self.target_dim)
        for module in self.reconstruction.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def initial_tokens(self, pixels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``[proxies, visible image tokens]`` and mask tokens (mask token + position)."""
        vit = self.encoder
        tokens = vit.embed_patches(pixels)
        visible = gather_tokens(tokens, mask, keep=False)
        pos = resample_position_embedding(vit.pos_embed, vit.patch_grid(pixels)).expand(tokens.shape[0], -1, -1)
        masked = self.mask_token.to(tokens.dtype) + gather_tokens(pos, mask, keep=True)
        return torch.cat([vit.prefix(tokens.shape[0]), visible], dim=1), masked

    def predict_masked(self, pixels: Tensor, mask: Tensor) -> Tensor:
        x, m = self.initial_tokens(pixels, mask)
        p, last = self.encoder.config.num_prefix_tokens, len(self.reconstruction) - 1
        for layer, (compression, reconstruction) in enumerate(zip(self.encoder.blocks, self.reconstruction)):
            x = compression(x)
            proxies = self.encoder.norm(x[:, :p]) if layer == last else x[:, :p]
            m = reconstruction(m, context=torch.cat([proxies, m], dim=1))
        return self.head(self.decoder_norm(m))
