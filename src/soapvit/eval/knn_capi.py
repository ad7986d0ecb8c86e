"""The CAPI kNN segmentation protocol (Darcet et al., 2025, ``eval_segmentation.py`` of CAPI), for
the original tokens and every correction's variant, with paired intervals.

- Images resized to 224 × 224 (bicubic; ``image_size`` overrides), label maps to the same size
  (nearest); everything is scored at that resolution.
- Features: the last block's patch tokens, standardised per dimension with the mean and standard
  deviation of all training patch tokens of the same variant (each variant its own statistics).
- Bank: every training patch with at least one labelled pixel keeps its ``p × p`` pixel labels
  at model resolution. A query patch finds its ``k`` nearest bank patches (cosine or L2 on the
  standardised tokens); each of its pixels takes the **mode of the labels at the same
  within-patch position** of those ``k`` neighbours (our reading of CAPI's "per-pixel mode of the
  neighbours' pixel labels"). Neighbours whose label at that position is ignored do not vote;
  ties go to the class whose voters are nearer (smaller sum of neighbour ranks); a pixel with no
  voter takes the patch-level mode of its neighbours' labelled pixels.
- Choice: ``k ∈ {1, 3, 10, 30}`` × {cosine, L2} chosen per variant by mIoU on a seeded 10% of the
  training images, held out of the bank during the choice (the statistics of the standardisation
  are those of all of train); ties go to the earlier candidate (cosine before L2, smaller k
  first). Then the bank is all of train and the chosen setting segments the evaluation split.
- Metrics: macro IoU over all pixels of the split (summed per-class counts) and pixel accuracy,
  from per-image tp/fp/fn so every variant gets its paired bootstrap interval against original.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed
from ..backbones.base import Backbone
from ..data.segmentation import SegmentationSplit
from ..errors import SoapvitError
from ..features import gather_log, iter_tokens
from ..runlog import Progress, RunLog
from .intervals import against_original, bootstrap_settings
from .knnseg import KnnConfig, KnnReport, _labels_at_input, merged_validation
from .metrics import SegmentationMetrics, class_iou
from .variants import describe_variant, plan_variants


def patch_pixel_labels(labels: np.ndarray, patch: int) -> np.ndarray:
    """``(H, W)`` labels (multiples of the patch) → ``(h·w, p·p)``: each patch's pixel labels in
    row-major order within the patch, patches in row-major order."""
    h, w = labels.shape[0] // patch, labels.shape[1] // patch
    return labels.reshape(h, patch, w, patch).transpose(0, 2, 1, 3).reshape(h * w, patch * patch)


def pixels_from_patches(values: Tensor, h: int, w: int, patch: int) -> Tensor:
    """Inverse of :func:`patch_pixel_labels`: ``(h·w, p·p)`` → ``(h·p, w·p)``."""
    return values.reshape(h, w, patch, patch).permute(0, 2, 1, 3).reshape(h * patch, w * patch)


def nearest(queries: Tensor, bank: Tensor, k: int, distance: str, memory_mb: float = 256.0) -> Tensor:
    """Indices ``(Q, k)`` of the ``k`` nearest bank rows, nearest first, by cosine similarity or
    Euclidean distance. ``bank`` may be float16: it is taken to float32 chunk by chunk, and the
    similarity block held at once stays within ``memory_mb`` of float32."""
    if distance not in ("cosine", "l2"):
        raise ValueError(f"distance must be cosine or l2, not {distance!r}")
    n = bank.shape[0]
    k = min(k, n)
    queries = queries.float()
    if distance == "cosine":
        queries = F.normalize(queries, dim=-1)
    budget = max(int(memory_mb * 2**20) // 4, 2 * k)
    bank_chunk = min(n, max(k, budget // min(max(queries.shape[0], 1), 1024)))
    query_chunk = max(1, budget // bank_chunk)
    out = []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk]
        best = torch.full((q.shape[0], 0), -float("inf"), device=q.device)
        best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for b0 in range(0, n, bank_chunk):
            b = bank[b0 : b0 + bank_chunk].float()
            if distance == "cosine":
                score = q @ F.normalize(b, dim=-1).T
            else:  # −‖q − b‖² up to the query's own norm
                score = 2 * (q @ b.T) - (b * b).sum(1)[None]
            top, idx = score.topk(min(k, score.shape[1]), dim=1)
            best, best_idx = torch.cat([best, top], 1), torch.cat([best_idx, idx + b0], 1)
            if best.shape[1] > k:
                best, keep = best.topk(k, dim=1)
                best_idx = best_idx.gather(1, keep)
        order = best.argsort(dim=1, descending=True, stable=True)
        out.append(best_idx.gather(1, order))
    return torch.cat(out) if out else torch.zeros((0, k), dtype=torch.long, device=queries.device)


def pixel_mode(neighbour_labels: Tensor, num_classes: int, chunk: int = 256) -> Tensor:
    """Per-pixel mode ``(Q, P)`` of ``neighbour_labels (Q, k, P)`` (nearest neighbour first; a
    label outside ``0..C-1``, e.g. the ignore index, does not vote). Ties: the class whose voters
    have the smaller sum of ranks; a pixel with no voter: the mode over all its neighbours'
    labelled pixels (class 0 if there is none)."""
    q, k, p = neighbour_labels.shape
    c = num_classes
    rank = torch.arange(k, device=neighbour_labels.device, dtype=torch.float32)
    weight = 1.0 + (k - rank) / (k * k + 1)  # tie-breakers sum to < 1: a count is never overturned
    out = []
    for q0 in range(0, q, chunk):
        lab = neighbour_labels[q0 : q0 + chunk].long()
        lab = torch.where((lab >= 0) & (lab < c), lab, torch.full_like(lab, c)).permute(0, 2, 1)  # (q, P, k)
        votes = torch.zeros(lab.shape[0], p, c + 1, device=lab.device)
        votes.scatter_add_(2, lab, weight.expand_as(lab).contiguous())
        votes = votes[..., :c]
        pred = votes.argmax(-1)
        empty = votes.sum(-1) == 0
        if empty.any():
            fallback = votes.sum(1).argmax(-1)  # (q,)
            pred = torch.where(empty, fallback[:, None].expand_as(pred), pred)
        out.append(pred)
    return torch.cat(out) if out else torch.zeros((0, p), dtype=torch.long)


@dataclass
class _TrainSet:
    features: dict[str, Tensor]  # variant → (N, D) float16, raw tokens of every training patch
    labels: Tensor  # (N, P) int64 pixel labels at model resolution
    image: Tensor  # (N,) position of the patch's image in dataset order
    n_images: int


def _encode_train(backbone: Backbone, train: SegmentationSplit, config: KnnConfig, corrections: Mapping,
                  log: RunLog, num_workers: int | None, progress: Progress | None) -> _TrainSet:
    block, p = backbone.num_blocks - 1, backbone.patch_size
    entries = []
    for batch in iter_tokens(backbone, train, config.image_transform(backbone), blocks=block, corrections=corrections,
                             batch_size=config.batch_size, num_workers=num_workers, across_ranks=True, log=log,
                             progress=progress, stage="training features"):
        for i, (index, lab) in enumerate(zip(batch.indices, batch.targets)):
            pixel_labels = torch.from_numpy(patch_pixel_labels(_labels_at_input(lab, batch.pixels), p).astype(np.int64))
            rows = {v: f.tokens[block][i].reshape(-1, f.tokens[block].shape[-1]).to("cpu", torch.float16)
                    for v, f in batch.variants.items()}
            entries.append((index, (pixel_labels, rows)))
    images = distributed.gather_by_index(entries)
    if not images:
        raise SoapvitError(f"--train: no training image could be read; first problems: "
                           f"{'; '.join(gather_log(log).lines()[:3])}")
    device = backbone.device
    features = {v: torch.cat([rows[v] for _, rows in images]).to(device) for v in images[0][1]}
    labels = torch.cat([lab for lab, _ in images]).to(device)
    image = torch.cat([torch.full((len(lab),), i) for i, (lab, _) in enumerate(images)]).to(device)
    return _TrainSet(features, labels, image, len(images))


def _standardiser(features: Tensor, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and standard deviation (float64 sums over float16 rows)."""
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    squares = torch.zeros_like(total)
    for s in range(0, features.shape[0], chunk):
        x = features[s : s + chunk].double()
        total += x.sum(0)
        squares += (x * x).sum(0)
    n = features.shape[0]
    mean = total / n
    std = (squares / n - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def _standardise(x: Tensor, mean: Tensor, std: Tensor, chunk: int = 65536) -> Tensor:
    return torch.cat([((x[s : s + chunk].float() - mean) / std).to(x.dtype) for s in range(0, x.shape[0], chunk)])


def _miou(prediction: Tensor, labels: Tensor, num_classes: int) -> float:
    gt, pred = labels.reshape(-1), prediction.reshape(-1)
    keep = (gt >= 0) & (gt < num_classes)
    confusion = torch.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).cpu().numpy()
    tp = np.diag(confusion)
    iou = class_iou(np.stack([tp, confusion.sum(0) - tp, confusion.sum(1) - tp], 1))
    return 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0


def choose_setting(features: Tensor, labels: Tensor, image: Tensor, n_images: int, num_classes: int,
                   config: KnnConfig) -> tuple[int, str, dict]:
    """``(k, distance, {distance: {k: mIoU}})``: the candidate with the best mIoU on a seeded
    ``holdout`` share of the training images, the rest being the bank (standardised features)."""
    if n_images < 2:
        raise SoapvitError("--protocol capi needs at least 2 training images (10% are held out for the choice)")
    gen = torch.Generator().manual_seed(config.seed)
    n_held = min(n_images - 1, max(1, round(config.holdout * n_images)))
    held = torch.zeros(n_images, dtype=torch.bool)
    held[torch.randperm(n_images, generator=gen)[:n_held]] = True
    held = held.to(image.device)[image]
    labelled = ((labels >= 0) & (labels < num_classes)).any(1)
    bank = ~held & labelled
    if not bank.any():
        raise SoapvitError("--protocol capi: no labelled training patch is left in the bank for the choice")
    queries, truth = features[held], labels[held]
    bank_features, bank_labels = features[bank], labels[bank]
    scores: dict[str, dict[int, float]] = {}
    best = (-1.0, config.k_choices[0], config.distances[0])
    for distance in config.distances:
        idx = nearest(queries, bank_features, max(config.k_choices), distance, config.memory_mb)
        scores[distance] = {}
        for k in config.k_choices:
            pred = pixel_mode(bank_labels[idx[:, :k]], num_classes)
            scores[distance][k] = _miou(pred, truth, num_classes)
            if scores[distance][k] > best[0]:
                best = (scores[distance][k], k, distance)
    return best[1], best[2], {"held_out_images": n_held, "miou": scores}


def evaluate_capi(backbone: Backbone, train: SegmentationSplit, val: SegmentationSplit, *,
                  corrections: Mapping | None = None, config: KnnConfig, num_workers: int | None = None,
                  progress: Progress | None = None) -> KnnReport:
    """The CAPI protocol (module doc) for the original tokens and each of ``corrections``."""
    log = RunLog()
    for path in train.missing + val.missing:
        log.skip(str(path), "no label map with this stem")
    corrections, passes = plan_variants(corrections, backbone, reads_keys=False, log=log)
    start = time.perf_counter()
    data = _encode_train(backbone, train, config, corrections, log, num_workers, progress)
    seconds = {"bank": time.perf_counter() - start}
    c, p = val.num_classes, backbone.patch_size
    labelled = ((data.labels >= 0) & (data.labels < c)).any(1)
    if not labelled.any():
        raise SoapvitError("--train: no training patch has a labelled pixel")
    bank_labels = data.labels[labelled]
    t0 = time.perf_counter()
    stats, banks, chosen, selection = {}, {}, {}, {}
    for v, raw in data.features.items():
        stats[v] = _standardiser(raw)
        standardised = _standardise(raw, *stats[v])
        k, distance, selection[v] = choose_setting(standardised, data.labels, data.image, data.n_images, c, config)
        chosen[v] = (k, distance)
        banks[v] = standardised[labelled]
    del data
    seconds["choice"] = time.perf_counter() - t0
    seconds["search"] = 0.0
    metrics = {v: SegmentationMetrics(c, val.ignore_index) for v in banks}
    block, done, n_queries = backbone.num_blocks - 1, 0, 0
    for batch in iter_tokens(backbone, val, config.image_transform(backbone), blocks=block, corrections=corrections,
                             batch_size=config.batch_size, num_workers=num_workers, across_ranks=True, log=log,
                             progress=progress, stage="kNN segmentation (capi)"):
        b, h, w, d = batch.original.tokens[block].shape
        truths = [_labels_at_input(lab, batch.pixels) for lab in batch.targets]
        for v, f in batch.variants.items():
            t1 = time.perf_counter()
            queries = (f.tokens[block].reshape(-1, d) - stats[v][0]) / stats[v][1]
            k, distance = chosen[v]
            idx = nearest(queries, banks[v], k, distance, config.memory_mb)
            pred = pixel_mode(bank_labels[idx], c).reshape(b, h * w, p * p)
            seconds["search"] += time.perf_counter() - t1
            n_queries += queries.shape[0]
            for i, index in enumerate(batch.indices):
                metrics[v].add(pixels_from_patches(pred[i], h, w, p).cpu().numpy(), truths[i], index)
        done += len(batch.indices)
    seconds["total"] = time.perf_counter() - start
    metrics, log, (done, n_queries) = merged_validation(metrics, log, done, n_queries)
    t0 = time.perf_counter()
    intervals = against_original(metrics)
    seconds["intervals"] = time.perf_counter() - t0
    results = {}
    for v, m in metrics.items():
        results[v] = {**m.result(val.class_names), "k": chosen[v][0], "distance": chosen[v][1]}
    return KnnReport(
        results=results,
        settings={**config.to_settings(), "model": backbone.model_id, "device": str(backbone.device),
                  "layout": val.layout, "ignore_index": val.ignore_index, "n_train": len(train), "n_val": done,
                  "scored_at": "model input resolution (labels resized nearest)",
                  "selection": selection,
                  "variants": {name: describe_variant(cr) for name, cr in corrections.items()},
                  "bootstrap": bootstrap_settings()},
        log=log, seconds=seconds, bank_size=int(bank_labels.shape[0]), n_queries=n_queries, intervals=intervals,
        per_image={v: m.per_image() for v, m in metrics.items()}, passes=passes,
    )
