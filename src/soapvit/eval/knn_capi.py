"""The CAPI kNN segmentation protocol (Darcet et al., 2025; ``KNNClassifier`` and ``eval_model``
of CAPI's ``eval_segmentation.py``), for the original tokens and every correction's variant, with
paired intervals.

- Images resized to 224 × 224 (bicubic; ``image_size`` overrides), label maps to the same size
  (nearest); everything is scored at that resolution.
- Choice split: a seeded 10% of the training images (``n // 10``, at least one) is held out;
  features are the last block's patch tokens standardised per dimension with the mean and
  standard deviation of the other 90% (each variant its own statistics, as CAPI's
  ``StandardScaler`` fitted on its training part).
- Bank: each training patch keeps its ``p × p`` pixel labels at model resolution; a patch whose
  most frequent pixel label is ignored (outside the classes) is left out. A query patch finds its
  ``k`` nearest bank patches (cosine or L2 on the standardised tokens) and each of its pixels
  takes the **mode of the ``k`` neighbours' labels at the same within-patch position**
  (``torch.mode``: ignored labels vote like any other, ties go to the smallest label). A pixel
  predicted as an ignored label is an error for its class.
- Choice: ``k ∈ {1, 3, 10, 30}`` × {cosine, L2} by mIoU on the held-out images with the other 90%
  as the bank; ties go to the earlier candidate in CAPI's grid order (smaller k first, cosine
  before L2 for one k). Then the bank is all of train and the chosen setting segments the
  evaluation split.
- Metrics: macro IoU over the classes present (summed per-class counts) and pixel accuracy, from
  per-image tp/fp/fn so every variant gets its paired bootstrap interval against original.
  (CAPI's scikit-learn ``jaccard_score`` would add a zero-IoU class for a predicted ignore label;
  here such pixels count as misses of their class only.)
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
from .metrics import SegmentationMetrics, class_counts, class_iou, confusion_matrix
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


def pixel_mode(neighbour_labels: Tensor, chunk: int = 4096) -> Tensor:
    """Per-pixel mode ``(Q, P)`` of ``neighbour_labels (Q, k, P)`` over the ``k`` neighbours; every
    label votes, ties go to the smallest (``torch.mode``, as CAPI)."""
    q, _, p = neighbour_labels.shape
    parts = [neighbour_labels[s : s + chunk].mode(dim=1).values for s in range(0, q, chunk)]
    return torch.cat(parts) if parts else torch.zeros((0, p), dtype=neighbour_labels.dtype)


def bank_patches(labels: Tensor, num_classes: int) -> Tensor:
    """``(N,)`` mask of the training patches whose most frequent pixel label is a class."""
    modal = labels.mode(dim=1).values
    return (modal >= 0) & (modal < num_classes)


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
    iou = class_iou(class_counts(confusion_matrix(prediction.cpu().numpy(), labels.cpu().numpy(), num_classes)))
    return 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0


def held_out_images(n_images: int, config: KnnConfig) -> Tensor:
    """``(n_images,)`` mask of the seeded share of training images held out for the choice."""
    if n_images < 2:
        raise SoapvitError("--protocol capi needs at least 2 training images (10% are held out for the choice)")
    n_held = min(n_images - 1, max(1, int(config.holdout * n_images)))
    held = torch.zeros(n_images, dtype=torch.bool)
    held[torch.randperm(n_images, generator=torch.Generator().manual_seed(config.seed))[:n_held]] = True
    return held


def choose_setting(features: Tensor, labels: Tensor, held: Tensor, num_classes: int,
                   config: KnnConfig, in_bank: Tensor | None = None) -> tuple[int, str, dict]:
    """``(k, distance, {"miou": {distance: {k: mIoU}}})``: the candidate with the
    best mIoU on the ``held`` patches (standardised ``features``), the bank being the other
    patches whose modal label is a class (``in_bank``, :func:`bank_patches` when not given);
    ties to the earlier candidate of CAPI's grid."""
    bank = ~held & (bank_patches(labels, num_classes) if in_bank is None else in_bank)
    if not bank.any():
        raise SoapvitError("--protocol capi: no labelled training patch is left in the bank for the choice")
    queries, truth = features[held], labels[held]
    bank_features, bank_labels = features[bank], labels[bank]
    scores: dict[str, dict[int, float]] = {}
    for distance in config.distances:
        idx = nearest(queries, bank_features, max(config.k_choices), distance, config.memory_mb)
        scores[distance] = {k: _miou(pixel_mode(bank_labels[idx[:, :k]]), truth, num_classes) for k in config.k_choices}
    grid = [(k, d) for k in config.k_choices for d in config.distances]
    k, distance = max(grid, key=lambda kd: scores[kd[1]][kd[0]])  # max keeps the first of equals
    return k, distance, {"miou": scores}


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
    in_bank = bank_patches(data.labels, c)
    if not in_bank.any():
        raise SoapvitError("--train: no training patch has a class as its most frequent label")
    bank_labels = data.labels[in_bank]
    t0 = time.perf_counter()
    held_images = held_out_images(data.n_images, config)
    held = held_images.to(data.image.device)[data.image]
    stats, banks, chosen, selection = {}, {}, {}, {}
    for v, raw in data.features.items():
        stats[v] = _standardiser(raw[~held])
        standardised = _standardise(raw, *stats[v])
        k, distance, selection[v] = choose_setting(standardised, data.labels, held, c, config, in_bank)
        selection[v] = {"held_out_images": int(held_images.sum()), **selection[v]}
        chosen[v] = (k, distance)
        banks[v] = standardised[in_bank]
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
            pred = pixel_mode(bank_labels[idx]).reshape(b, h * w, p * p)
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
