"""Native Vision Transformer in the style of timm, and its :class:`Backbone` adapter.

:class:`VisionTransformer` is the network every pre-training objective trains: conv patch
embedding, a learned position embedding of the patch grid (resampled bicubically for other
input sizes), ``num_prefix_tokens`` learned prefix tokens without position (CLS first; several
act as SemanticMIM proxies), pre-norm blocks with SDPA attention, a final LayerNorm.
:class:`VisionTransformerBackbone` exposes it through the uniform feature API and reads/writes
fp16 safetensors whose metadata holds the architecture (``zoo:`` models are such files).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SoapvitError
from ..safetensors_io import read_safetensors
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, RawOutput


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a :class:`VisionTransformer` (stored in every checkpoint)."""

    image_size: int = 64
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_prefix_tokens: int = 1
    qkv_bias: bool = True

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class Attention(nn.Module):
    """Multi-head attention with a fused ``qkv`` projection; self- or cross-attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(
        self, x: Tensor, context: Tensor | None = None, *, with_probs: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Queries from ``x``, keys/values from ``context`` (``x`` itself when ``None``).

        Returns ``(output, keys (B, M, D), probabilities (B, heads, N, M) or None)``; the
        probabilities are computed explicitly only when asked, otherwise SDPA runs."""
        dim = x.shape[-1]
        if context is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            bias = self.qkv.bias
            q = F.linear(x, self.qkv.weight[:dim], None if bias is None else bias[:dim])
            k, v = F.linear(context, self.qkv.weight[dim:], None if bias is None else bias[dim:]).chunk(2, dim=-1)
        qh, kh, vh = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        probs = None
        if with_probs:
            probs = torch.softmax((qh * self.scale) @ kh.transpose(-2, -1), dim=-1)
            out = probs @ vh
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh)
        out = out.transpose(1, 2).reshape(x.shape)
        return self.proj(out), k, probs


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)


class Block(nn.Module):
    """Pre-norm transformer block; with ``context`` its attention is cross-attention (the
    context is normalised by the same ``norm1``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward_inspect(
        self, x: Tensor, context: Tensor | None = None, *, with_probs: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(output, attention keys, attention probabilities or None)``."""
        ctx = None if context is None else self.norm1(context)
        attended, keys, probs = self.attn(self.norm1(x), ctx, with_probs=with_probs)
        x = x + attended
        return x + self.mlp(self.norm2(x)), keys, probs

    def forward(self, x: Tensor, context: Tensor | None = None, *, with_probs: bool = False,
                inspect: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor | None]:
        """The output; with ``inspect`` the triple of :meth:`forward_inspect` (called as a module,
        so that hooks on the block see the pass)."""
        out = self.forward_inspect(x, context, with_probs=with_probs)
        return out if inspect else out[0]


def resample_position_embedding(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bicubic resampling of a square ``(1, g*g, D)`` patch position embedding to ``grid``."""
    n, dim = pos.shape[1], pos.shape[2]
    side = int(round(n**0.5))
    if (side, side) == tuple(grid):
        return pos
    square = pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    out = F.interpolate(square.float(), size=grid, mode="bicubic", align_corners=False, antialias=True)
    return out.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


class VisionTransformer(nn.Module):
    """The network: ``embed`` → ``blocks`` → ``norm``; sequences are prefix tokens first."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = nn.Conv2d(3, dim, config.patch_size, config.patch_size)
        self.prefix_tokens = nn.Parameter(torch.zeros(1, config.num_prefix_tokens, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid**2, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.qkv_bias) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.prefix_tokens, std=1e-6 if self.config.num_prefix_tokens == 1 else 0.02)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def patch_grid(self, pixels: Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        return pixels.shape[-2] // p, pixels.shape[-1] // p

    def embed_patches(self, pixels: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """Patch embeddings plus position ``(B, N, D)``; where ``mask`` (B, N) is true the
        embedding is replaced by ``mask_token`` (D,) before the position is added (SimMIM)."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        return x + resample_position_embedding(self.pos_embed, self.patch_grid(pixels))

    def prefix(self, batch: int) -> Tensor:
        return self.prefix_tokens.expand(batch, -1, -1)

    def forward(self, pixels: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """Final-norm full sequence ``(B, P + N, D)``."""
        x = self.embed_patches(pixels, mask, mask_token)
        x = torch.cat([self.prefix(x.shape[0]), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VisionTransformerBackbone(Backbone):
    """A :class:`VisionTransformer` behind the feature API; saved as fp16 safetensors."""

    def __init__(self, config: ViTConfig, model_id: str = "vit:native", network: VisionTransformer | None = None) -> None:
        super().__init__(
            model_id,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            num_blocks=config.depth,
            num_heads=config.num_heads,
            num_prefix_tokens=config.num_prefix_tokens,
            image_size=config.image_size,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
        self.vit = network if network is not None else VisionTransformer(config)
        self.config = config

    def block_modules(self):
        return self.vit.blocks

    def mlp_activation_modules(self):
        return [block.mlp.act for block in self.vit.blocks]

    def _run(self, pixels, blocks, norm, keys, attentions, edits) -> RawOutput:
        vit = self.vit
        x = vit.embed_patches(pixels)
        x = torch.cat([vit.prefix(x.shape[0]), x], dim=1)
        final = len(vit.blocks) - 1
        wanted, attn_ids = set(blocks), set(attentions)
        last = final if keys else max(wanted | attn_ids | set(edits))
        hidden, maps, key_seq = {}, {}, None
        for i, block in enumerate(vit.blocks[: last + 1]):
            x, block_keys, probs = block(x, with_probs=i in attn_ids, inspect=True)
            if i in edits:
                x = edits[i](x)
            if probs is not None:
                maps[i] = probs
            if keys and i == final:
                key_seq = block_keys
            if i in wanted:
                hidden[i] = vit.norm(x) if i in norm else x
        return RawOutput(hidden=hidden, keys=key_seq, attentions=maps)

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | Path, card: dict[str, Any] | None = None) -> Path:
        """Write fp16 weights with ``config`` (architecture) and ``card`` JSON metadata."""
        from ..io import save_safetensors

        path = Path(path)
        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.vit.state_dict().items()}
        metadata = {"format": "soapvit-vit", "config": json.dumps(asdict(self.config))}
        if card is not None:
            metadata["card"] = json.dumps(card)
        return save_safetensors(state, path, metadata, "model file")

    @classmethod
    def from_checkpoint(cls, path: str | Path, model_id: str | None = None) -> "VisionTransformerBackbone":
        """Load a file written by :meth:`save` (weights are upcast to float32)."""
        path = Path(path)
        tensors, metadata = read_safetensors(path, "checkpoint")
        state = {k: v.float() for k, v in tensors.items()}
        if "config" not in metadata:
            raise SoapvitError(f"checkpoint {path} has no 'config' metadata (not a soapvit ViT file)")
        config = ViTConfig(**json.loads(metadata["config"]))
        backbone = cls(config, model_id or f"vit:{path.stem}")
        backbone.vit.load_state_dict(state)
        backbone.card = json.loads(metadata.get("card", "{}"))
        return backbone.eval()


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card stored in a checkpoint's metadata (empty dict when none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("card", "{}"))
