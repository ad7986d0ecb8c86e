"""Per-patch kNN semantic segmentation of the original tokens and every correction's variant
(one pass where a variant maps the output), with paired intervals. Two protocols, named by
``KnnConfig.protocol`` and recorded in the report:

``hummingbird`` (Balažević et al., NeurIPS 2023; the default). Memory bank: the L2-normalised
patch tokens of the training images, each with a soft label (the class histogram of its pixels
at model-input resolution, ignore label excluded; patches with no labelled pixel are left out).
A query patch takes its ``k`` most cosine-similar bank
patches and votes with ``softmax(sim / T)`` weights over their soft labels; the class scores are
upsampled (nearest or bilinear) to the label map's resolution, argmax'ed and scored (mIoU and
pixel accuracy, ignore excluded). ``hungarian=True`` (off by default; the public
open-hummingbird-eval code applies it) relabels each variant's predictions by the one-to-one
class matching that maximises the matched pixels of its dataset confusion matrix
(:func:`scipy.optimize.linear_sum_assignment`) before scoring.

``capi`` (Darcet et al., 2025, CAPI's ``eval_segmentation.py``): :mod:`.knn_capi`.

The similarity search is chunked over queries and over the bank so that the similarity block
stays inside ``memory_mb`` on any device; ``max_bank`` caps the bank by sampling patches
uniformly at random (seeded) before they are encoded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .. import distributed
from ..backbones.base import Backbone
from ..data.segmentation import SegmentationSplit
from ..data.transforms import RESAMPLING, ImageTransform
from ..errors import SoapvitError
from ..features import TokenBatch, gather_log, iter_tokens
from ..runlog import Progress, RunLog, RunReport
from ..validation import COUNT, OPTIONAL_COUNT, POSITIVE, Interval, Options, validate
from .intervals import against_original, bootstrap_settings
from .metrics import SegmentationMetrics, across_ranks, class_counts, confusion_matrix
from .variants import describe_variant, plan_variants

UPSAMPLING = ("nearest", "bilinear")
PROTOCOLS = ("hummingbird", "capi")
CONSTRAINTS = {
    "protocol": Options(PROTOCOLS), "k": COUNT, "temperature": POSITIVE, "upsample": Options(UPSAMPLING), "image_size": OPTIONAL_COUNT,
    "resample": Options(tuple(RESAMPLING)), "max_bank": OPTIONAL_COUNT, "memory_mb": POSITIVE, "batch_size": COUNT,
    "seed": Interval(int),
}


@dataclass
class KnnConfig:
    protocol: str = "hummingbird"
    k: int = 30
    temperature: float = 0.02
    upsample: str = "nearest"
    image_size: int | None = None  # shorter side at model input; None → the backbone's resolution
    resample: str = "bicubic"
    max_bank: int | None = None
    memory_mb: float = 256.0
    batch_size: int = 8
    seed: int = 0
    hungarian: bool = False  # hummingbird only
    # capi only: the candidates of the choice and the share of train held out for it
    k_choices: tuple[int, ...] = (1, 3, 10, 30)
    distances: tuple[str, ...] = ("cosine", "l2")
    holdout: float = 0.1

    def __post_init__(self) -> None:
        validate({k: v for k, v in self.__dict__.items() if k in CONSTRAINTS}, CONSTRAINTS)
        self.k_choices, self.distances = tuple(int(k) for k in self.k_choices), tuple(self.distances)
        if not self.k_choices or min(self.k_choices) < 1:
            raise SoapvitError(f"k choices must be counts >= 1, not {self.k_choices}")
        if not self.distances or set(self.distances) - {"cosine", "l2"}:
            raise SoapvitError(f"distances must be cosine and/or l2, not {self.distances}")
        if not 0 < self.holdout < 1:
            raise SoapvitError(f"the held-out share of train must be in (0, 1), not {self.holdout}")
        if self.protocol == "capi" and self.hungarian:
            raise SoapvitError("--hungarian belongs to the hummingbird protocol (capi scores its labels as they are)")
        if self.max_bank is not None and self.max_bank < self.k:
            raise SoapvitError(f"--max-bank ({self.max_bank}) must be at least --k ({self.k})")

    def image_transform(self, backbone: Backbone) -> ImageTransform:
        if self.protocol == "capi":  # 224 × 224 bicubic (or --image-size), masks nearest
            return ImageTransform.for_backbone(backbone, size=self.image_size or 224, mode="square",
                                               resample=self.resample)
        size = self.image_size or backbone.image_size
        return ImageTransform.for_backbone(backbone, size=size, mode="aspect", resample=self.resample)

    def to_settings(self) -> dict:
        """The settings the protocol uses (the other protocol's fields left out)."""
        out = dict(self.__dict__)
        drop = ("k", "temperature", "upsample", "max_bank", "hungarian") if self.protocol == "capi" else (
            "k_choices", "distances", "holdout")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items() if k not in drop}


def patch_soft_labels(labels: np.ndarray, patch: int, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Class histograms of the ``patch × patch`` cells of ``labels (H, W)`` (H, W multiples of the
    patch). Returns ``(histograms (h·w, C) summing to 1, labelled (h·w,) bool)``."""
    h, w = labels.shape[0] // patch, labels.shape[1] // patch
    cells = labels.reshape(h, patch, w, patch).transpose(0, 2, 1, 3).reshape(h * w, patch * patch)
    valid = (cells != ignore_index) & (cells >= 0) & (cells < num_classes)
    rows = np.broadcast_to(np.arange(h * w)[:, None], cells.shape)
    counts = np.bincount((rows * num_classes + cells)[valid], minlength=h * w * num_classes)
    counts = torch.from_numpy(counts.reshape(h * w, num_classes).astype(np.float32))
    total = counts.sum(1)
    return counts / total.clamp_min(1)[:, None], total > 0


def knn_vote(queries: Tensor, bank: Tensor, bank_labels: Tensor, k: int, temperature: float,
             memory_mb: float = 256.0) -> Tensor:
    """Class scores ``(Q, C)``: softmax(top-k cosine / T)-weighted soft labels of the nearest
    bank patches. ``queries (Q, D)`` and ``bank (N, D)`` must be L2-normalised; the similarity
    block computed at once holds at most ``memory_mb`` of float32."""
    n = bank.shape[0]
    k = min(k, n)
    budget = max(int(memory_mb * 2**20) // 4, 2 * k)
    bank_chunk = min(n, max(k, budget // min(queries.shape[0], 1024)))
    query_chunk = max(1, budget // bank_chunk)
    scores = []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk]
        best_sim = torch.full((q.shape[0], 0), -2.0, device=q.device, dtype=q.dtype)
        best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for b0 in range(0, n, bank_chunk):
            sim = q @ bank[b0 : b0 + bank_chunk].T
            top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            best_sim = torch.cat([best_sim, top_sim], 1)
            best_idx = torch.cat([best_idx, top_idx + b0], 1)
            if best_sim.shape[1] > k:
                best_sim, keep = best_sim.topk(k, dim=1)
                best_idx = best_idx.gather(1, keep)
        weights = torch.softmax(best_sim / temperature, dim=1)
        scores.append(torch.einsum("qk,qkc->qc", weights, bank_labels[best_idx]))
    return torch.cat(scores)


def upsample_scores(scores: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """``(C, h, w)`` → ``(C, H, W)``."""
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(scores[None], size=size, mode=mode, **kwargs)[0]


def hungarian_matching(confusion: np.ndarray) -> np.ndarray:
    """``assigned[p]``: the label class predicted class ``p`` is renamed to, the one-to-one
    matching that maximises the matched pixels of ``confusion`` (rows labels, columns predictions)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(confusion, maximize=True)
    assigned = np.arange(confusion.shape[1])
    assigned[cols] = rows
    return assigned


@dataclass
class ConfusionMetrics:
    """Per-image confusion matrices, scored after one dataset-level Hungarian matching."""

    num_classes: int
    ignore_index: int | None = None
    confusions: dict[int, np.ndarray] = field(default_factory=dict)

    def add(self, prediction: np.ndarray, labels: np.ndarray, index: int) -> None:
        self.confusions[int(index)] = confusion_matrix(prediction, labels, self.num_classes, self.ignore_index)[:, :-1]

    def merge(self, other: ConfusionMetrics) -> ConfusionMetrics:
        self.confusions.update(other.confusions)
        return self

    def matched(self) -> tuple[SegmentationMetrics, np.ndarray]:
        """The per-image tp/fp/fn after the matching of the summed confusion, and the matching."""
        c = self.num_classes
        total = sum(self.confusions.values(), np.zeros((c, c), np.int64))
        assigned = hungarian_matching(total)
        metrics = SegmentationMetrics(c, self.ignore_index)
        for index, confusion in self.confusions.items():
            renamed = np.zeros_like(confusion)
            renamed[:, assigned] = confusion  # column p moves to column assigned[p]
            metrics.counts[index] = class_counts(renamed)
        return metrics, assigned


@dataclass
class MemoryBank:
    features: dict[str, Tensor]  # variant → (N, D) normalised
    labels: Tensor  # (N, C)

    @property
    def size(self) -> int:
        return self.labels.shape[0]


@dataclass
class KnnReport(RunReport):
    bank_size: int = 0
    n_queries: int = 0
    intervals: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)
    passes: dict = field(default_factory=dict)

    kind = "knnseg"

    @property
    def patches_per_second(self) -> float:
        """Query patches classified per second of similarity search and voting (all variants)."""
        return self.n_queries / max(self.seconds.get("search", 0.0), 1e-9)


def _normalised_variants(batch: TokenBatch, block: int) -> dict[str, Tensor]:
    return {v: F.normalize(f.tokens[block].reshape(-1, f.tokens[block].shape[-1]), dim=-1)
            for v, f in batch.variants.items()}


def _labels_at_input(labels: np.ndarray, pixels: Tensor) -> np.ndarray:
    """A label map resized (nearest) to the model input's size."""
    return np.asarray(Image.fromarray(labels.astype(np.int32)).resize((pixels.shape[-1], pixels.shape[-2]),
                                                                      Image.Resampling.NEAREST))


def build_memory_bank(backbone: Backbone, split: SegmentationSplit, config: KnnConfig, *,
                      corrections: Mapping | None = None,
                      log: RunLog, num_workers: int | None = None, progress: Progress | None = None) -> MemoryBank:
    """Encode the training split once and keep (a sample of) its labelled patches, in dataset
    order; under torchrun each process encodes its share and the bank is gathered on every rank."""
    transform = config.image_transform(backbone)
    p = backbone.patch_size
    keep_global, offsets = None, {}
    if config.max_bank is not None:
        sizes = {}
        for i in range(len(split)):
            try:
                sizes[i] = transform.output_size(*split.image_size(i))
            except SoapvitError:
                continue  # logged by the pipeline
        start = 0
        for i, (w, h) in sizes.items():
            offsets[i] = start
            start += (w // p) * (h // p)
        if start > config.max_bank:
            gen = torch.Generator().manual_seed(config.seed)
            keep_global = torch.zeros(start, dtype=torch.bool)
            keep_global[torch.randperm(start, generator=gen)[: config.max_bank]] = True
    entries: list[tuple[int, tuple[Tensor, dict[str, Tensor]]]] = []
    block = backbone.num_blocks - 1
    keep_on = "cpu" if distributed.active() else backbone.device
    for batch in iter_tokens(backbone, split, transform, blocks=block, corrections=corrections,
                             batch_size=config.batch_size, num_workers=num_workers, across_ranks=True, log=log,
                             progress=progress, stage="memory bank"):
        per_variant = _normalised_variants(batch, block)
        n_patch = batch.original.tokens[block].shape[1] * batch.original.tokens[block].shape[2]
        for i, (index, lab) in enumerate(zip(batch.indices, batch.targets)):
            hist, labelled = patch_soft_labels(_labels_at_input(lab, batch.pixels), p, split.num_classes,
                                               split.ignore_index)
            if keep_global is not None:
                labelled &= keep_global[offsets[index] : offsets[index] + n_patch]
            rows = {v: f[i * n_patch : (i + 1) * n_patch][labelled.to(f.device)].to(keep_on)
                    for v, f in per_variant.items()}
            entries.append((index, (hist[labelled], rows)))
    images = distributed.gather_by_index(entries)
    if not images:
        raise SoapvitError(f"--train: no training image could be read; first problems: "
                           f"{'; '.join(gather_log(log).lines()[:3])}")
    features = {v: torch.cat([rows[v] for _, rows in images]).to(backbone.device) for v in images[0][1]}
    return MemoryBank(features, torch.cat([labels for labels, _ in images]).to(backbone.device))


def merged_validation(metrics: dict, log: RunLog, *counts: int) -> tuple[dict, RunLog, list[int]]:
    """The per-image accumulators, the log and the counts (validation images first) of every rank
    of a :mod:`torch.distributed` group; a one-line error when no validation image was read."""
    metrics, log = across_ranks(metrics), gather_log(log)
    counts = distributed.all_reduce_sum(torch.tensor(counts)).tolist()
    if counts[0] == 0:
        raise SoapvitError(f"--val: no validation image could be read; first problems: {'; '.join(log.lines()[:3])}")
    return metrics, log, counts


def evaluate_knnseg(backbone: Backbone, train: SegmentationSplit, val: SegmentationSplit, *,
                    corrections: Mapping | None = None, config: KnnConfig | None = None,
                    num_workers: int | None = None, progress: Progress | None = None) -> KnnReport:
    """kNN segmentation of ``val`` with a bank from ``train``, for the original tokens and each of
    ``corrections`` (name → fitted correction, checked against the backbone), each variant with
    its own memory bank (a correction at an earlier block has its own pass)."""
    config = config or KnnConfig()
    if train.num_classes != val.num_classes:
        raise SoapvitError(f"--train has {train.num_classes} classes but --val has {val.num_classes}")
    if config.protocol == "capi":
        from .knn_capi import evaluate_capi

        return evaluate_capi(backbone, train, val, corrections=corrections, config=config, num_workers=num_workers,
                             progress=progress)
    log = RunLog()
    for path in train.missing + val.missing:
        log.skip(str(path), "no label map with this stem")
    corrections, passes = plan_variants(corrections, backbone, reads_keys=False, log=log)
    start = time.perf_counter()
    bank = build_memory_bank(backbone, train, config, corrections=corrections, log=log, num_workers=num_workers,
                             progress=progress)
    seconds = {"bank": time.perf_counter() - start, "search": 0.0}
    accumulator = ConfusionMetrics if config.hungarian else SegmentationMetrics
    metrics = {v: accumulator(val.num_classes, val.ignore_index) for v in bank.features}
    block, done, n_queries = backbone.num_blocks - 1, 0, 0
    for batch in iter_tokens(backbone, val, config.image_transform(backbone), blocks=block, corrections=corrections,
                             batch_size=config.batch_size, num_workers=num_workers, across_ranks=True, log=log,
                             progress=progress, stage="kNN segmentation"):
        b, h, w, _ = batch.original.tokens[block].shape
        for v, queries in _normalised_variants(batch, block).items():
            t0 = time.perf_counter()
            scores = knn_vote(queries, bank.features[v], bank.labels, config.k, config.temperature,
                              config.memory_mb).reshape(b, h, w, -1).permute(0, 3, 1, 2)
            seconds["search"] += time.perf_counter() - t0
            n_queries += queries.shape[0]
            for i, (index, lab) in enumerate(zip(batch.indices, batch.targets)):
                pred = upsample_scores(scores[i], lab.shape, config.upsample).argmax(0).cpu().numpy()
                metrics[v].add(pred, lab, index)
        done += len(batch.indices)
    seconds["total"] = time.perf_counter() - start
    metrics, log, (done, n_queries) = merged_validation(metrics, log, done, n_queries)
    matchings = {}
    if config.hungarian:
        for v in list(metrics):
            metrics[v], assigned = metrics[v].matched()
            matchings[v] = {val.class_names[p]: val.class_names[g] for p, g in enumerate(assigned)}
    t0 = time.perf_counter()
    intervals = against_original(metrics)
    seconds["intervals"] = time.perf_counter() - t0
    results = {v: m.result(val.class_names) for v, m in metrics.items()}
    for v, matching in matchings.items():
        results[v]["hungarian_matching"] = matching  # predicted class → the label class it is scored as
    return KnnReport(
        results=results,
        settings={**config.to_settings(), "model": backbone.model_id, "device": str(backbone.device),
                  "layout": val.layout, "ignore_index": val.ignore_index, "n_train": len(train), "n_val": done,
                  "variants": {name: describe_variant(c) for name, c in corrections.items()},
                  "bootstrap": bootstrap_settings()},
        log=log, seconds=seconds, bank_size=bank.size, n_queries=n_queries, intervals=intervals,
        per_image={v: m.per_image() for v, m in metrics.items()}, passes=passes,
    )
