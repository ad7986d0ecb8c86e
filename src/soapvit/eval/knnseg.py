"""Per-patch kNN semantic segmentation (Hummingbird-style), original and SOAP from one pass.

Memory bank: the L2-normalised patch tokens of the training images, each with a soft label
(the class histogram of its pixels at model-input resolution, ignore label excluded; patches
with no labelled pixel are left out). A query patch takes its ``k`` most cosine-similar bank
patches and votes with ``softmax(sim / T)`` weights over their soft labels; the class scores are
upsampled (nearest or bilinear) to the label map's resolution, argmax'ed and scored (mIoU and
pixel accuracy, ignore excluded; supervised labels, so no Hungarian matching).

The similarity search is chunked over queries and over the bank so that the similarity block
stays inside ``memory_mb`` on any device; ``max_bank`` caps the bank by sampling patches
uniformly at random (seeded) before they are encoded.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..backbones.base import Backbone
from ..data.images import ImageReadError, ImageTransform, load_image
from ..data.segmentation import SegmentationSample, SegmentationSplit
from ..errors import SoapvitError
from ..features import encode
from .metrics import SegmentationMetrics

UPSAMPLING = ("nearest", "bilinear")
Progress = Callable[[str, int, int], None]


@dataclass
class KnnSettings:
    k: int = 30
    temperature: float = 0.02
    upsample: str = "nearest"
    image_size: int | None = None  # shorter side at model input; None → the backbone's resolution
    resample: str = "bicubic"
    max_bank: int | None = None
    memory_mb: float = 256.0
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise SoapvitError(f"--k must be at least 1, not {self.k}")
        if self.temperature <= 0:
            raise SoapvitError(f"--temperature must be positive, not {self.temperature}")
        if self.upsample not in UPSAMPLING:
            raise SoapvitError(f"--upsample must be one of {', '.join(UPSAMPLING)}, not {self.upsample!r}")
        if self.max_bank is not None and self.max_bank < self.k:
            raise SoapvitError(f"--max-bank ({self.max_bank}) must be at least --k ({self.k})")

    def transform(self, backbone: Backbone) -> ImageTransform:
        size = self.image_size or backbone.image_size
        return ImageTransform.for_backbone(backbone, size=size, mode="aspect", resample=self.resample)


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


@dataclass
class MemoryBank:
    features: dict[str, Tensor]  # variant → (N, D) normalised
    labels: Tensor  # (N, C)

    @property
    def size(self) -> int:
        return self.labels.shape[0]


@dataclass
class KnnReport:
    results: dict[str, dict]
    settings: dict
    bank_size: int
    n_queries: int
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def patches_per_second(self) -> float:
        """Query patches classified per second of similarity search and voting (all variants)."""
        return self.n_queries / max(self.seconds.get("search", 0.0), 1e-9)


def _input_sizes(split: SegmentationSplit, transform: ImageTransform, skipped: list[str]):
    sizes = {}
    for s in split.samples:
        try:
            with Image.open(s.image) as img:
                sizes[s] = transform.output_size(*img.size)
        except (OSError, ValueError, SyntaxError) as err:
            skipped.append(f"{s.image}: cannot read image ({err})")
    return sizes


def _batches(split: SegmentationSplit, sizes: dict, transform: ImageTransform, batch_size: int, skipped: list[str],
             notes: list[str]):
    """Batches of equal input size: ``(samples, pixels, labels at original size)``."""
    groups: dict[tuple[int, int], list[SegmentationSample]] = {}
    for s, size in sizes.items():
        groups.setdefault(size, []).append(s)
    for group in groups.values():
        for first in range(0, len(group), batch_size):
            samples, pixels, labels = [], [], []
            for s in group[first : first + batch_size]:
                try:
                    image = load_image(s.image)
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        lab = split.load_labels(s, size=image.size)
                    notes.extend(str(w.message) for w in caught)
                except ImageReadError as err:
                    skipped.append(str(err))
                    continue
                samples.append(s)
                pixels.append(transform(image))
                labels.append(lab)
            if samples:
                yield samples, torch.stack(pixels), labels


def _variants(tokens: Tensor, head) -> dict[str, Tensor]:
    out = {"original": tokens}
    if head is not None:
        out["soap"] = head.transform(tokens)
    return {v: F.normalize(t.reshape(-1, t.shape[-1]), dim=-1) for v, t in out.items()}


def build_memory_bank(backbone: Backbone, split: SegmentationSplit, settings: KnnSettings, *, head=None,
                      skipped: list[str], notes: list[str], progress: Progress | None = None) -> MemoryBank:
    """Encode the training split once and keep (a sample of) its labelled patches."""
    transform = settings.transform(backbone)
    p = backbone.patch_size
    sizes = _input_sizes(split, transform, skipped)
    total = sum((w // p) * (h // p) for w, h in sizes.values())
    keep_global = None
    if settings.max_bank is not None and total > settings.max_bank:
        gen = torch.Generator().manual_seed(settings.seed)
        keep_global = torch.zeros(total, dtype=torch.bool)
        keep_global[torch.randperm(total, generator=gen)[: settings.max_bank]] = True
    offsets, start = {}, 0
    for s, (w, h) in sizes.items():
        offsets[s] = start
        start += (w // p) * (h // p)
    feats: dict[str, list[Tensor]] = {}
    labels: list[Tensor] = []
    done = 0
    block = backbone.num_blocks - 1
    for samples, pixels, label_maps in _batches(split, sizes, transform, settings.batch_size, skipped, notes):
        tokens = encode(backbone, pixels.to(backbone.device), block).tokens[block]
        n_patch = tokens.shape[1] * tokens.shape[2]
        per_variant = _variants(tokens, head)
        for i, (s, lab) in enumerate(zip(samples, label_maps)):
            resized = np.asarray(Image.fromarray(lab.astype(np.int32)).resize(
                (pixels.shape[-1], pixels.shape[-2]), Image.Resampling.NEAREST))
            hist, labelled = patch_soft_labels(resized, p, split.num_classes, split.ignore_index)
            if keep_global is not None:
                labelled &= keep_global[offsets[s] : offsets[s] + n_patch]
            labels.append(hist[labelled])
            for v, f in per_variant.items():
                feats.setdefault(v, []).append(f[i * n_patch : (i + 1) * n_patch][labelled.to(f.device)])
        done += len(samples)
        if progress:
            progress("memory bank", done, len(split))
    if not labels:
        raise SoapvitError(f"--train: no training image could be read; first problems: {'; '.join(skipped[:3])}")
    device = backbone.device
    return MemoryBank({v: torch.cat(f) for v, f in feats.items()}, torch.cat(labels).to(device))


def evaluate_knnseg(backbone: Backbone, train: SegmentationSplit, val: SegmentationSplit, *, head=None,
                    settings: KnnSettings | None = None, progress: Progress | None = None) -> KnnReport:
    """kNN segmentation of ``val`` with a bank from ``train``; with a head, also SOAP tokens."""
    settings = settings or KnnSettings()
    if train.num_classes != val.num_classes:
        raise SoapvitError(f"--train has {train.num_classes} classes but --val has {val.num_classes}")
    if head is not None and head.apply_layer != backbone.num_blocks - 1:
        raise SoapvitError(f"--head applies to block {head.apply_layer}, but kNN segmentation uses the last block")
    skipped = [f"{p}: no label map with this stem" for p in train.missing + val.missing]
    notes: list[str] = []
    start = time.perf_counter()
    bank = build_memory_bank(backbone, train, settings, head=head, skipped=skipped, notes=notes, progress=progress)
    seconds = {"bank": time.perf_counter() - start, "search": 0.0}
    transform = settings.transform(backbone)
    sizes = _input_sizes(val, transform, skipped)
    metrics = {v: SegmentationMetrics(val.num_classes, val.ignore_index) for v in bank.features}
    block, done, n_queries = backbone.num_blocks - 1, 0, 0
    for samples, pixels, label_maps in _batches(val, sizes, transform, settings.batch_size, skipped, notes):
        tokens = encode(backbone, pixels.to(backbone.device), block).tokens[block]
        b, h, w, _ = tokens.shape
        for v, queries in _variants(tokens, head).items():
            t0 = time.perf_counter()
            scores = knn_vote(queries, bank.features[v], bank.labels, settings.k, settings.temperature,
                              settings.memory_mb).reshape(b, h, w, -1).permute(0, 3, 1, 2)
            seconds["search"] += time.perf_counter() - t0
            n_queries += queries.shape[0]
            for i, lab in enumerate(label_maps):
                pred = upsample_scores(scores[i], lab.shape, settings.upsample).argmax(0).cpu().numpy()
                metrics[v].add(pred, lab)
        done += len(samples)
        if progress:
            progress("kNN segmentation", done, len(val))
    seconds["total"] = time.perf_counter() - start
    if done == 0:
        raise SoapvitError(f"--val: no validation image could be read; first problems: {'; '.join(skipped[:3])}")
    return KnnReport(
        results={v: m.result(val.class_names) for v, m in metrics.items()},
        settings={**settings.__dict__, "model": backbone.model_id, "device": str(backbone.device),
                  "layout": val.layout, "ignore_index": val.ignore_index, "n_train": len(train), "n_val": done},
        bank_size=bank.size, n_queries=n_queries, skipped=skipped, warnings=notes, seconds=seconds,
    )
