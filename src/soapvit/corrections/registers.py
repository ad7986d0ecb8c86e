"""``registers``: test-time registers (Jiang et al., NeurIPS 2025, "Vision Transformers Don't Need
Trained Registers"; repository nickjiang2378/test-time-registers).

Calibration, one pass: a patch token whose norm at ``outlier_block`` (the block's output, no
final norm) exceeds ``threshold`` is an outlier; ``threshold=None`` takes
``median + 6 · 1.4826 · MAD`` of the patch-token norms of the first calibration batch, kept for
the rest of the pass. Every MLP neuron of blocks ``0..highest_block`` scores its mean absolute
activation at an image's outliers, averaged over the images that have outliers (as the reference
code); the ``top_k`` best are the register neurons.

Inference (:class:`RegisterBackbone`): one extra token, zero on entry to block 0, sits right
after the prefix tokens: with absolute position embeddings the place is immaterial, and RoPE
models that take every token before the patches as a prefix (transformers' DINOv3) count it as one. At each register neuron the extra token takes
the neuron's signed maximum over all tokens of the image (largest magnitude, sign kept) and the
patch tokens are zeroed; prefix tokens keep theirs, as in the reference. Every returned sequence,
the keys and the attention maps are without the extra token (attention rows then sum to less than
one: the register's share is left out).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import Tensor

from ..backbones.base import Backbone, Edit, RawOutput
from ..errors import SoapvitError
from ..validation import COUNT, Interval
from .base import Correction
from .high_norm import MAD_SCALE

MAD_SIGMAS = 6.0


def mad_threshold(norms: Tensor) -> float:
    """``median + 6 · 1.4826 · MAD`` of ``norms``."""
    median = norms.median()
    return float(median + MAD_SIGMAS * MAD_SCALE * (norms - median).abs().median())


def _drop(t: Tensor, at: int, dim: int) -> Tensor:
    """``t`` without index ``at`` along ``dim``."""
    return torch.cat([t.narrow(dim, 0, at), t.narrow(dim, at + 1, t.shape[dim] - at - 1)], dim)


class RegisterNeurons(Correction):
    """Move the register neurons' activation to one extra token (see module doc)."""

    method = "registers"
    fitted = ("neurons_", "scores_", "threshold_")
    constraints = {"outlier_block": Interval(int), "threshold": Interval(float, 0, open_low=True, optional=True),
                   "highest_block": Interval(int, optional=True), "top_k": COUNT}
    calibrates = True
    edits_forward = True
    source = "Jiang et al., NeurIPS 2025 (Vision Transformers Don't Need Trained Registers)"

    neurons_: Tensor  # (k, 2) int64: block, neuron
    scores_: Tensor  # (k,)
    threshold_: Tensor  # ()

    def __init__(self, outlier_block: int = -2, threshold: float | None = None, highest_block: int | None = None,
                 top_k: int = 10) -> None:
        """Blocks are 0-based, negative from the end; ``highest_block`` None is ``outlier_block``.
        ``top_k=10`` is the published setting for ViT-B/16 (OpenCLIP); DINOv2-L uses 50."""
        self.outlier_block, self.threshold = outlier_block, threshold
        self.highest_block, self.top_k = highest_block, top_k
        super().__init__()

    def calibrate(self, backbone: Backbone, batches: Iterable[Tensor], block: int) -> RegisterNeurons:
        """Find the register neurons; ``block`` is unused: the method edits the whole pass."""
        outlier = backbone.resolve_blocks(self.outlier_block)[0]
        highest = outlier if self.highest_block is None else backbone.resolve_blocks(self.highest_block)[0]
        p = backbone.num_prefix_tokens
        acts: dict[int, Tensor] = {}
        handles = [module.register_forward_hook(lambda _m, _i, out, b=b: acts.__setitem__(b, out[:, p:].abs().float()))
                   for b, module in enumerate(backbone.mlp_activation_modules()[: highest + 1])]
        threshold, totals, images = self.threshold, None, 0
        try:
            with torch.no_grad():
                for pixels in batches:
                    raw = backbone._run(pixels, sorted({outlier, highest}), frozenset(), False, [], {})
                    norms = raw.hidden[outlier][:, p:].float().norm(dim=-1)  # (B, N)
                    threshold = mad_threshold(norms) if threshold is None else threshold
                    mask = (norms > threshold).float()
                    count = mask.sum(1)
                    weights = mask[count > 0] / count[count > 0, None]  # per image: mean over its outliers
                    scores = torch.stack([torch.einsum("bn,bnh->h", weights, acts[b][count > 0]).double()
                                          for b in range(highest + 1)])  # (blocks, H)
                    totals = scores if totals is None else totals + scores
                    images += len(weights)
        finally:
            for handle in handles:
                handle.remove()
        if totals is None:
            raise SoapvitError("registers: no calibration images")
        if images == 0:
            raise SoapvitError(f"registers: no patch token of the calibration images has a norm above {threshold:.4g} "
                               f"at block {outlier} (lower --threshold)")
        mean = (totals / images).flatten()
        if self.top_k > mean.numel():
            raise SoapvitError(f"--top-k {self.top_k} exceeds the {mean.numel()} MLP neurons of blocks 0..{highest}")
        values, index = mean.topk(self.top_k)
        width = totals.shape[1]
        self.neurons_ = torch.stack([index // width, index % width], 1).long().cpu()
        self.scores_ = values.float().cpu()
        self.threshold_ = torch.tensor(float(threshold))
        self.block_, self.dim_ = backbone.num_blocks - 1, backbone.embed_dim
        return self

    def wrap(self, backbone: Backbone) -> Backbone:
        return RegisterBackbone(backbone, self)


class RegisterBackbone(Backbone):
    """``backbone`` with one test-time register in its forward pass (module doc). An edit passed
    to it sees the usual sequence, without the register."""

    def __init__(self, backbone: Backbone, correction: RegisterNeurons) -> None:
        desc = backbone.describe()
        desc.pop("model_id")
        super().__init__(f"{backbone.model_id}+{correction.method}", **desc)
        self.backbone = backbone
        self.correction = correction
        neurons = correction.neurons_.long()
        if len(neurons) and int(neurons[:, 0].max()) >= backbone.num_blocks:
            raise SoapvitError(f"registers: a register neuron is in block {int(neurons[:, 0].max())} but "
                               f"{backbone.model_id} has {backbone.num_blocks} blocks")
        self.neurons = {int(b): neurons[neurons[:, 0] == b, 1] for b in neurons[:, 0].unique()}

    def _insert(self, x: Tensor) -> Tensor:
        p = self.num_prefix_tokens
        return torch.cat([x[:, :p], x.new_zeros(x.shape[0], 1, x.shape[2]), x[:, p:]], 1)

    def _enter(self, _module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pre-hook of block 0: the sequence arrives positionally (native, most hf layers) or as
        ``hidden_states``."""
        if args:
            return (self._insert(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._insert(kwargs["hidden_states"])}

    def _shift(self, index: Tensor, _module, _inputs, out: Tensor) -> Tensor:
        """Hook of an MLP activation ``(B, P + 1 + N, H)``: the register neurons' signed maximum to
        the register, zero on the patches."""
        p, index = self.num_prefix_tokens, index.to(out.device)
        chosen = out[..., index]
        peak = chosen.gather(1, chosen.abs().argmax(1, keepdim=True))
        chosen = torch.cat([chosen[:, :p], peak, torch.zeros_like(chosen[:, p + 1:])], 1)
        return out.index_copy(out.dim() - 1, index, chosen)

    def _edit(self, fn: Edit, seq: Tensor) -> Tensor:
        p = self.num_prefix_tokens
        edited = fn(_drop(seq, p, 1))
        return torch.cat([edited[:, :p], seq[:, p:p + 1], edited[:, p:]], 1)

    def _run(self, pixels, blocks, norm, keys, attentions, edits) -> RawOutput:
        p, acts = self.num_prefix_tokens, self.backbone.mlp_activation_modules()
        handles = [self.backbone.block_modules()[0].register_forward_pre_hook(self._enter, with_kwargs=True)]
        handles += [acts[b].register_forward_hook(partial(self._shift, index)) for b, index in self.neurons.items()]
        wrapped: dict[int, Edit] = {b: partial(self._edit, fn) for b, fn in edits.items()}
        try:
            raw = self.backbone._run(pixels, blocks, norm, keys, attentions, wrapped)
        finally:
            for handle in handles:
                handle.remove()
        return RawOutput(hidden={b: _drop(h, p, 1) for b, h in raw.hidden.items()},
                         keys=None if raw.keys is None else _drop(raw.keys, p, 1),
                         attentions={b: _drop(_drop(a, p, -2), p, -1) for b, a in raw.attentions.items()})
