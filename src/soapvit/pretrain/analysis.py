"""Attention analyses of a trained backbone (SemanticMIM appendix A): mean attention distance
per block and head, and the attention map of one query patch."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..features import encode


def patch_distances(grid: tuple[int, int], patch_size: int) -> Tensor:
    """Euclidean distance in pixels between the centres of every pair of patches ``(N, N)``."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * patch_size
    return torch.cdist(centres, centres)


def attention_distance(attention: Tensor, num_prefix: int, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Mean attention distance per head ``(heads,)`` from attention maps ``(B, heads, P+N, P+N)``:
    for every patch query, the distance to every patch weighted by its attention (renormalised
    over the patches, prefix tokens left out), averaged over queries and images."""
    patch_attn = attention[:, :, num_prefix:, num_prefix:]
    patch_attn = patch_attn / patch_attn.sum(-1, keepdim=True).clamp_min(1e-12)
    dist = patch_distances(grid, patch_size).to(patch_attn)
    return (patch_attn * dist).sum(-1).mean(dim=(0, 2))


@torch.no_grad()
def mean_attention_distance(backbone: Backbone, pixels: Tensor, batch_size: int = 64) -> Tensor:
    """``(blocks, heads)`` mean attention distance in pixels over the images ``pixels``."""
    grid = backbone.grid_size(pixels)
    total = torch.zeros(backbone.num_blocks, backbone.num_heads)
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(backbone.device)
        feats = encode(backbone, chunk, "last", attentions="all")
        for block, attn in feats.attentions.items():
            total[block] += attention_distance(attn, backbone.num_prefix_tokens, grid, backbone.patch_size).cpu() * chunk.shape[0]
    return total / pixels.shape[0]


@torch.no_grad()
def query_attention(backbone: Backbone, pixels: Tensor, block: int, query: tuple[int, int]) -> Tensor:
    """Attention of the patch at grid position ``query`` (row, col) over the patches of one
    image, per head ``(heads, h, w)``, renormalised over the patches."""
    h, w = backbone.grid_size(pixels)
    feats = encode(backbone, pixels[:1].to(backbone.device), block, attentions=[block])
    p = backbone.num_prefix_tokens
    row = feats.attentions[backbone.resolve_blocks(block)[0]][0, :, p + query[0] * w + query[1], p:]
    return (row / row.sum(-1, keepdim=True)).reshape(-1, h, w).cpu()
