"""The one interface every backbone source implements.

A :class:`Backbone` wraps a Vision Transformer and returns, from a single forward pass, the
patch tokens of any set of blocks as ``(B, h, w, D)`` grids with the prefix tokens (CLS,
registers, proxies) split off, optionally the last block's attention keys and attention maps.
Sources (``hf:``, ``timm:``, ``zoo:``, the native ViT) only implement :meth:`Backbone._run`.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import SoapvitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLOCK_FEATURES = ("residual", "branch")
# ``norm="last"``: the final norm on the last block only, i.e. each block's tokens as a correction
# there edits them (the head rule: the model's output at the last block, the residual stream inside
# the forward pass at an earlier one). What a fit gathers, so a correction is fitted on what it edits.
EDITED_TOKENS = "last"
NORMS = (True, False, EDITED_TOKENS)
# the norm in front of a pre-norm block's MLP, by family (timm, native and DINOv2 / CLIP / ViT, BEiT)
MLP_NORM_NAMES = ("norm2", "layer_norm2", "layernorm_after")

Edit = Callable[[Tensor], Tensor]
"""Replaces a block's output sequence ``(B, P + h*w, D)`` (prefix first) inside the forward pass,
so that every later block sees the edited tokens."""


@dataclass
class Features:
    """What one forward pass returns, indexed by block (0-based)."""

    tokens: dict[int, Tensor]
    """block → patch tokens ``(B, h, w, D)``."""
    prefix: dict[int, Tensor]
    """block → prefix tokens ``(B, P, D)`` (CLS first, then registers/proxies)."""
    keys: Tensor | None = None
    """last block's attention keys of the patches ``(B, h, w, D)``, heads concatenated."""
    attentions: dict[int, Tensor] = field(default_factory=dict)
    """block → attention probabilities ``(B, heads, N, N)`` over the full sequence, prefix first."""


@dataclass
class RawOutput:
    """What a source returns: full sequences (prefix first), before splitting."""

    hidden: dict[int, Tensor]
    """block → ``(B, P + h*w, D)``, final norm already applied when requested."""
    keys: Tensor | None = None
    """``(B, P + h*w, D)`` last-block keys."""
    attentions: dict[int, Tensor] = field(default_factory=dict)


class Backbone(nn.Module):
    """A ViT with a uniform feature API.

    Attributes describe the model: ``patch_size``, ``embed_dim``, ``num_blocks``, ``num_heads``,
    ``num_prefix_tokens``, and its preprocessing: ``image_mean``, ``image_std``, ``image_size``
    (the resolution it was trained at).
    """

    def __init__(
        self,
        model_id: str,
        *,
        patch_size: int,
        embed_dim: int,
        num_blocks: int,
        num_heads: int,
        num_prefix_tokens: int,
        image_size: int = 224,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.model_id = model_id
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.num_blocks = int(num_blocks)
        self.num_heads = int(num_heads)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.image_size = int(image_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)

    # -- to implement -------------------------------------------------------------------------
    def _run(
        self, pixels: Tensor, blocks: Sequence[int], norm: Container[int], keys: bool, attentions: Sequence[int],
        edits: Mapping[int, Edit],
    ) -> RawOutput:
        """One forward pass; ``edits[b]`` replaces block ``b``'s output before later blocks (and
        before it is returned); the blocks in ``norm`` are returned with the final norm applied."""
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------------------
    def resolve_blocks(self, blocks: int | str | Iterable[int] | None) -> list[int]:
        """Normalise a block selection: ``None``/``"last"`` → last block, ``"all"`` → every
        block, ints may be negative. Returns sorted unique 0-based indices."""
        if blocks is None or blocks == "last":
            return [self.num_blocks - 1]
        if blocks == "all":
            return list(range(self.num_blocks))
        if isinstance(blocks, int):
            blocks = [blocks]
        out = set()
        for b in blocks:
            b = int(b)
            idx = b + self.num_blocks if b < 0 else b
            if not 0 <= idx < self.num_blocks:
                raise SoapvitError(f"block {b} is out of range for {self.model_id} ({self.num_blocks} blocks: "
                                   f"0..{self.num_blocks - 1}, or negative from the end)")
            out.add(idx)
        return sorted(out)

    def grid_size(self, pixels: Tensor) -> tuple[int, int]:
        height, width = pixels.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise SoapvitError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def forward_features(
        self,
        pixels: Tensor,
        blocks: int | str | Iterable[int] | None = None,
        *,
        norm: bool | str = True,
        keys: bool = False,
        attentions: int | str | Iterable[int] | None = (),
        edits: Mapping[int, Edit] | None = None,
        block_features: str = "residual",
    ) -> Features:
        """Encode normalised ``pixels`` ``(B, 3, H, W)`` once and return the requested outputs.

        ``norm`` applies the model's final normalisation to every returned block (``True``, as
        DINOv2's ``get_intermediate_layers`` does), to none (``False``), or to the last block only
        (``"last"``: each block as a correction there edits it, see :data:`EDITED_TOKENS`); ``keys`` adds the last block's attention keys;
        ``attentions`` names the blocks whose attention maps to return; ``edits`` maps a block
        to an :data:`Edit` of its output inside the pass.

        ``block_features="residual"`` returns each block's output (the residual stream, final norm
        applied when ``norm``); ``"branch"`` returns what the SOAP authors hook for their depth
        sweep, the last child module of a timm block: the MLP branch's output (after layer scale),
        un-normalised, computed as block output minus the MLP's residual input.
        """
        if not isinstance(pixels, Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3 \
                or not pixels.is_floating_point():
            got = (f"a {pixels.dtype} tensor of shape {tuple(pixels.shape)}" if isinstance(pixels, Tensor)
                   else f"a {type(pixels).__name__}")
            raise SoapvitError(f"pixels must be a float tensor (B, 3, H, W), normalised as the backbone's "
                               f"image_mean/image_std give (ImageTransform.for_backbone), not {got}")
        weight = next(self.parameters(), None)
        if weight is not None and weight.is_floating_point() and pixels.dtype != weight.dtype \
                and not torch.is_autocast_enabled(pixels.device.type):
            pixels = pixels.to(weight.dtype)  # e.g. float64 pixels for float32 weights
        h, w = self.grid_size(pixels)
        block_ids = self.resolve_blocks(blocks)
        attn_ids = self.resolve_blocks(attentions) if attentions not in ((), [], None) else []
        edits = {self.resolve_blocks(b)[0]: fn for b, fn in (edits or {}).items()}
        if block_features not in BLOCK_FEATURES:
            raise SoapvitError(f"--block-features must be one of {', '.join(BLOCK_FEATURES)}, not {block_features!r}")
        if block_features == "branch":
            raw = self._run_branches(pixels, block_ids, keys, attn_ids, edits)
        else:
            raw = self._run(pixels, block_ids, self._normalised(block_ids, norm), keys, attn_ids, edits)
        p = self.num_prefix_tokens
        tokens, prefix = {}, {}
        for b in block_ids:
            seq = raw.hidden[b]
            prefix[b] = seq[:, :p]
            tokens[b] = seq[:, p:].reshape(seq.shape[0], h, w, seq.shape[-1])
        key_grid = None
        if keys:
            if raw.keys is None:
                raise NotImplementedError(f"{self.model_id} does not expose attention keys")
            key_grid = raw.keys[:, p:].reshape(raw.keys.shape[0], h, w, raw.keys.shape[-1])
        return Features(tokens=tokens, prefix=prefix, keys=key_grid, attentions=raw.attentions)

    def block_modules(self) -> Sequence[nn.Module]:
        """The transformer blocks, in order (for hooks); sources that can, override this."""
        raise SoapvitError(f"{self.model_id} does not expose its blocks (needed for --block-features branch)")

    def mlp_activation_modules(self) -> Sequence[nn.Module]:
        """Per block, the module whose output is the MLP's hidden activation ``(B, P + h*w, H)``
        (after the non-linearity, before the second linear layer): the edit point of test-time
        registers. Sources that can, override this."""
        raise SoapvitError(f"{self.model_id} does not expose its MLP activations (needed for test-time registers)")

    def _run_branches(self, pixels, blocks, keys, attentions, edits) -> RawOutput:
        """One pass whose ``hidden[b]`` is block ``b``'s MLP-branch output (block output minus the
        input of the norm in front of its MLP)."""
        mids: dict[int, Tensor] = {}
        handles = []
        for b in blocks:
            block = self.block_modules()[b]
            norm = next((m for n, m in block.named_children() if n in MLP_NORM_NAMES), None)
            if norm is None:
                raise SoapvitError(f"{self.model_id}: block {b} has no MLP norm ({', '.join(MLP_NORM_NAMES)})")
            handles.append(norm.register_forward_pre_hook(lambda _m, args, b=b: mids.__setitem__(b, args[0])))
        try:
            raw = self._run(pixels, blocks, frozenset(), keys, attentions, edits)
        finally:
            for handle in handles:
                handle.remove()
        raw.hidden = {b: raw.hidden[b] - mids[b] for b in blocks}
        return raw

    def _normalised(self, blocks: Sequence[int], norm: bool | str) -> frozenset[int]:
        if norm not in NORMS:
            raise SoapvitError(f"norm must be True, False or 'last', not {norm!r}")
        if norm == "last":
            return frozenset(blocks) & {self.num_blocks - 1}
        return frozenset(blocks) if norm else frozenset()

    def forward(self, pixels: Tensor) -> Tensor:
        """Final-norm patch tokens of the last block, ``(B, h, w, D)``."""
        return self.forward_features(pixels).tokens[self.num_blocks - 1]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def weights_digest(self) -> str:
        """Short content digest of every parameter and buffer (names, dtypes, shapes, bytes)."""
        from .wheels import tensor_digest

        return tensor_digest(self.state_dict())[:16]

    def describe(self) -> dict:
        """Plain-data description, stored in head files and model cards."""
        return {
            "model_id": self.model_id,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "num_blocks": self.num_blocks,
            "num_heads": self.num_heads,
            "num_prefix_tokens": self.num_prefix_tokens,
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
