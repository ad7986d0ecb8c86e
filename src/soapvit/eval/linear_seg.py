"""Linear semantic-segmentation probe on frozen patch tokens (the DINOv2 linear protocol scaled to
a CPU), for the original tokens and every correction's variant, with paired intervals.

DINOv2's linear head (Oquab et al., 2023; mmseg ``BNHead``): BatchNorm + a 1×1 convolution on the
last block's patch tokens, logits upsampled bilinearly to the label resolution, cross-entropy
that skips the ignore index, AdamW (lr 1e-3, weight decay 1e-4) with a poly schedule
(``lr·(1 − it/iterations)^0.9``), a fixed number of iterations. Scaled down: images resized to a
square at the backbone's resolution (no crops, no augmentation), so the tokens of the training
split are computed once per variant and held in memory as float16; training labels are taken at
model-input resolution (nearest), evaluation upsamples the logits to each label map's own size.
Each variant trains its own probe from the same seed on the same batch order. Scores: mIoU and
pixel accuracy on the evaluation split, per-image tp/fp/fn kept for the paired bootstrap.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..backbones.base import Backbone
from ..data.segmentation import SegmentationSplit
from ..data.transforms import RESAMPLING, ImageTransform
from ..errors import SoapvitError
from ..features import gather_log, iter_tokens
from ..runlog import Progress, RunLog, RunReport
from ..validation import COUNT, OPTIONAL_COUNT, POSITIVE, Interval, Options, validate
from .intervals import against_original, bootstrap_settings
from .knnseg import _labels_at_input, merged_validation
from .metrics import SegmentationMetrics
from .variants import describe_variant, plan_variants

CONSTRAINTS = {
    "iterations": COUNT, "batch_size": COUNT, "lr": POSITIVE, "weight_decay": Interval(float, 0),
    "power": POSITIVE, "image_size": OPTIONAL_COUNT, "resample": Options(tuple(RESAMPLING)), "encode_batch_size": COUNT,
    "seed": Interval(int), "loss_points": COUNT,
}


@dataclass
class LinearSegConfig:
    iterations: int = 1000
    batch_size: int = 16  # images per iteration
    lr: float = 1e-3
    weight_decay: float = 1e-4
    power: float = 0.9  # poly schedule
    image_size: int | None = None  # square side at model input; None → the backbone's resolution
    resample: str = "bicubic"
    encode_batch_size: int = 8
    seed: int = 0
    loss_points: int = 20  # the loss curve of the report: mean loss over this many equal windows

    def __post_init__(self) -> None:
        validate(self.__dict__, CONSTRAINTS)

    def image_transform(self, backbone: Backbone) -> ImageTransform:
        return ImageTransform.for_backbone(backbone, size=self.image_size or backbone.image_size, mode="square",
                                           resample=self.resample)


class LinearHead(nn.Module):
    """BatchNorm + 1×1 convolution on ``(B, D, h, w)`` tokens → ``(B, C, h, w)`` logits."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.conv(self.bn(tokens))


def poly_lr(iteration: int, iterations: int, power: float) -> float:
    """The poly schedule's factor at ``iteration`` (0-based)."""
    return (1.0 - iteration / iterations) ** power


def train_probe(features: Tensor, labels: Tensor, num_classes: int, ignore_index: int,
                config: LinearSegConfig) -> tuple[LinearHead, list[float]]:
    """Train one probe on ``features (N, h, w, D)`` (any float dtype, converted per batch) and
    ``labels (N, H, W)``; returns the probe (in eval mode) and the per-iteration losses. Batches
    are drawn epoch by epoch from a seeded permutation; a batch with no labelled pixel is skipped."""
    n, _, _, dim = features.shape
    device = features.device
    torch.manual_seed(config.seed)
    head = LinearHead(dim, num_classes).to(device)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda it: poly_lr(it, config.iterations, config.power))
    gen = torch.Generator().manual_seed(config.seed)
    order, position, losses = torch.randperm(n, generator=gen), 0, []
    batch = min(config.batch_size, n)
    head.train()
    for _ in range(config.iterations):
        if position + batch > n:
            order, position = torch.randperm(n, generator=gen), 0
        idx = order[position : position + batch].to(device)
        position += batch
        target = labels[idx].long()
        if (target != ignore_index).any():
            logits = head(features[idx].float().permute(0, 3, 1, 2))
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        schedule.step()
    return head.eval(), losses


def loss_curve(losses: list[float], points: int) -> list[float]:
    """Mean loss over ``points`` equal windows of training."""
    if not losses:
        return []
    return [float(np.mean(chunk)) for chunk in np.array_split(np.asarray(losses), min(points, len(losses)))]


@dataclass
class LinearSegReport(RunReport):
    n_train: int = 0
    intervals: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)
    passes: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)  # variant → loss curve

    kind = "linseg"

    @property
    def images_per_second(self) -> float:
        """Evaluation images segmented per second (all variants, encoding included)."""
        return self.settings.get("n_val", 0) / max(self.seconds.get("eval", 0.0), 1e-9)


def evaluate_linear_seg(backbone: Backbone, train: SegmentationSplit, val: SegmentationSplit, *,
                        corrections: Mapping | None = None, config: LinearSegConfig | None = None,
                        num_workers: int | None = None, progress: Progress | None = None) -> LinearSegReport:
    """Train a linear probe per variant on ``train`` and score it on ``val`` (module doc)."""
    config = config or LinearSegConfig()
    if train.num_classes != val.num_classes:
        raise SoapvitError(f"--train has {train.num_classes} classes but --val has {val.num_classes}")
    log = RunLog()
    for path in train.missing + val.missing:
        log.skip(str(path), "no label map with this stem")
    corrections, passes = plan_variants(corrections, backbone, reads_keys=False, log=log)
    transform, block = config.image_transform(backbone), backbone.num_blocks - 1
    start = time.perf_counter()
    entries = []
    for batch in iter_tokens(backbone, train, transform, blocks=block, corrections=corrections,
                             batch_size=config.encode_batch_size, num_workers=num_workers, across_ranks=True,
                             log=log, progress=progress, stage="training features"):
        for i, (index, lab) in enumerate(zip(batch.indices, batch.targets)):
            target = torch.from_numpy(_labels_at_input(lab, batch.pixels).astype(np.int64))
            entries.append((index, (target, {v: f.tokens[block][i].to("cpu", torch.float16)
                                             for v, f in batch.variants.items()})))
    images = distributed.gather_by_index(entries)
    del entries
    if not images:
        raise SoapvitError(f"--train: no training image could be read; first problems: "
                           f"{'; '.join(gather_log(log).lines()[:3])}")
    device = backbone.device
    labels = torch.stack([t for t, _ in images]).to(device)
    features = {v: torch.stack([rows[v] for _, rows in images]).to(device) for v in images[0][1]}
    del images
    seconds = {"features": time.perf_counter() - start}
    t0 = time.perf_counter()
    heads, losses = {}, {}
    for v in list(features):
        heads[v], losses[v] = train_probe(features.pop(v), labels, val.num_classes, val.ignore_index, config)
    if not any(losses.values()):
        raise SoapvitError("--train: no training pixel is labelled")
    seconds["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = {v: SegmentationMetrics(val.num_classes, val.ignore_index) for v in heads}
    done = 0
    with torch.no_grad():
        for batch in iter_tokens(backbone, val, transform, blocks=block, corrections=corrections,
                                 batch_size=config.encode_batch_size, num_workers=num_workers, across_ranks=True,
                                 log=log, progress=progress, stage="linear probe"):
            for v, f in batch.variants.items():
                logits = heads[v](f.tokens[block].permute(0, 3, 1, 2))
                for i, (index, lab) in enumerate(zip(batch.indices, batch.targets)):
                    up = F.interpolate(logits[i : i + 1], size=lab.shape, mode="bilinear", align_corners=False)
                    metrics[v].add(up[0].argmax(0).cpu().numpy(), lab, index)
            done += len(batch.indices)
    seconds["eval"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    metrics, log, (done,) = merged_validation(metrics, log, done)
    intervals = against_original(metrics)
    curves = {v: loss_curve(loss, config.loss_points) for v, loss in losses.items()}
    results = {v: {**m.result(val.class_names), "first_loss": curves[v][0] if curves[v] else float("nan"),
                   "final_loss": curves[v][-1] if curves[v] else float("nan")} for v, m in metrics.items()}
    return LinearSegReport(
        results=results,
        settings={**config.__dict__, "protocol": "dinov2-linear (BatchNorm + 1x1 conv, bilinear, AdamW, poly)",
                  "model": backbone.model_id, "device": str(device), "layout": val.layout,
                  "ignore_index": val.ignore_index, "n_train": int(labels.shape[0]), "n_val": done,
                  "input": list(transform.output_size(1, 1)),
                  "variants": {name: describe_variant(c) for name, c in corrections.items()},
                  "bootstrap": bootstrap_settings()},
        log=log, seconds=seconds, n_train=int(labels.shape[0]), intervals=intervals,
        per_image={v: m.per_image() for v, m in metrics.items()}, passes=passes, loss=curves,
    )
