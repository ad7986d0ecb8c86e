"""A small deterministic Backbone for tests: patch embedding, a strong additive position
embedding (a non-semantic signal SOAP should find), one prefix token, two residual blocks."""

import torch
from torch import nn

from soapvit.backbones.base import Backbone, RawOutput


class ToyBackbone(Backbone):
    def __init__(self, dim: int = 16, patch: int = 4, blocks: int = 2, grid: int = 4, pos_scale: float = 3.0, seed: int = 0):
        super().__init__("toy:test", patch_size=patch, embed_dim=dim, num_blocks=blocks, num_heads=1,
                         num_prefix_tokens=1, image_size=patch * grid)
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Conv2d(3, dim, patch, patch)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(self.embed.weight.shape, generator=g) * 0.2)
            self.embed.bias.zero_()
        self.pos = nn.Parameter(torch.randn(grid * grid, dim, generator=g) * pos_scale)
        self.cls = nn.Parameter(torch.randn(1, 1, dim, generator=g))
        self.mix = nn.ParameterList([nn.Parameter(torch.randn(dim, dim, generator=g) / dim**0.5) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)

    def _run(self, pixels, blocks, norm, keys, attentions, edits):
        x = self.embed(pixels).flatten(2).transpose(1, 2) + self.pos[: (pixels.shape[-1] // self.patch_size) ** 2]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        hidden = {}
        for i, w in enumerate(self.mix):
            x = x + torch.tanh(x @ w)
            if i in edits:
                x = edits[i](x)
            if i in blocks:
                hidden[i] = self.norm(x) if norm else x
        return RawOutput(hidden=hidden, keys=x @ self.mix[-1] if keys else None)
