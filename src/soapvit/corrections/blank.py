"""``blank``: subtract the tokens of the image that is zero after normalisation (the ImageNet-mean
image), the probe image of DVT (Yang et al., ECCV 2024, "Denoising Vision Transformers") and
INSID3 (Cuttano et al., CVPR 2026).

``z̃_p = z_p − t_p`` with ``t`` the zero image's patch tokens at the same grid and block, taken
as the correction edits them (final norm at the last block, the fit's default). At another grid the template is one forward of the backbone
given to :meth:`~BlankTemplate.prepare` (cached per grid); with none, the fit's template
resampled bilinearly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backbones.base import EDITED_TOKENS, Backbone
from ..errors import SoapvitError
from ..features import encode
from ..stats import FitStatistics
from .base import Correction
from .posmean import resample_grid


class BlankTemplate(Correction):
    """Subtract the zero image's tokens (see module doc)."""

    method = "blank"
    requires = frozenset({"zero_image"})
    fitted = ("template_",)
    source = "Yang et al., ECCV 2024 (DVT) and Cuttano et al., CVPR 2026 (INSID3): the zero-image probe"

    template_: Tensor  # (h, w, D)

    def __init__(self) -> None:
        super().__init__()
        self._backbone: Backbone | None = None
        self._templates: dict[tuple[int, int], Tensor] = {}

    def fit(self, stats: FitStatistics, block: int) -> BlankTemplate:
        if block not in stats.zero_image:
            raise SoapvitError(f"blank: the fit holds no zero-image tokens for block {block}")
        self.template_ = stats.zero_image[block].float()
        self.block_, self.dim_ = block, int(self.template_.shape[-1])
        return self

    def prepare(self, backbone: Backbone) -> None:
        self._backbone, self._templates = backbone, {}

    def at_grid(self, grid: tuple[int, int]) -> None:
        self.template(tuple(grid))

    def template(self, grid: tuple[int, int]) -> Tensor:
        """The zero image's tokens ``(h, w, D)`` at ``grid``."""
        if grid == tuple(self.template_.shape[:2]):
            return self.template_
        if self._backbone is None:
            return resample_grid(self.template_, grid)
        if grid not in self._templates:
            p = self._backbone.patch_size
            zeros = torch.zeros(1, 3, grid[0] * p, grid[1] * p, device=self._backbone.device)
            self._templates[grid] = encode(self._backbone, zeros, [self.block_], norm=EDITED_TOKENS).tokens[self.block_][0]
        return self._templates[grid]

    def transform(self, tokens: Tensor) -> Tensor:
        return tokens - self.template(tuple(tokens.shape[-3:-1])).to(tokens.device, tokens.dtype)
