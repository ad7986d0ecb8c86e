"""Fitting a SOAP head: the data passes that feed :mod:`stats` and then :mod:`soap`.

Pass 1 encodes the real images once and accumulates the moments of every requested block
(tokens are cached when they fit in ``cache_gb``); pass 2 counts the responses of
the real tokens (from the cache, else a second forward) and of the synthetic images (their only
forward). With the cache every image is encoded exactly once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import __version__
from .backbones.base import Backbone
from .data.images import ImageTransform, list_images
from .data.synthetic import SyntheticImages
from .errors import SoapvitError
from .features import SkipReport, encode, iter_batches, resolve_device
from .soap import BlockStatistics, SoapConfig, SoapHead
from .stats import ResponseCounts, StreamingMoments, principal_components

Progress = Callable[[str, int, int], None]
"""``progress(stage, images_done, images_total)``."""


@dataclass
class FitReport:
    """What a fit did: counts, skipped files, time."""

    n_real: int
    n_synthetic: int
    skipped: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = True

    @property
    def images_per_second(self) -> float:
        return (self.n_real + self.n_synthetic) / max(self.seconds, 1e-9)


def default_workers(device: torch.device) -> int:
    """Image-decoding workers: none on CPU (they would compete with the model), up to 8 on GPU."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def collect_statistics(
    backbone: Backbone,
    files: Sequence[Path],
    synthetic: SyntheticImages,
    *,
    blocks: Sequence[int],
    transform: ImageTransform,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    norm: bool = True,
    cache_gb: float = 8.0,
    num_workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[dict[int, BlockStatistics], FitReport]:
    """Run both passes and return per-block statistics and a report."""
    device = torch.device(device)
    workers = default_workers(device) if num_workers is None else num_workers
    side = transform.output_size(1, 1)[0] // backbone.patch_size
    grid, dim = (side, side), backbone.embed_dim
    cache_bytes = len(files) * side * side * dim * len(blocks) * 4
    use_cache = cache_bytes <= cache_gb * 2**30
    skipped = SkipReport()
    start = time.perf_counter()

    def real_batches(report: SkipReport | None):
        return iter_batches(files, transform, batch_size=batch_size, device=device,
                            num_workers=workers, skipped=report)

    # pass 1: moments of the real tokens
    moments = {b: StreamingMoments(dim, device) for b in blocks}
    position_sum = {b: torch.zeros(*grid, dim, dtype=torch.float64, device=device) for b in blocks}
    cache: list[dict[int, Tensor]] = []
    done = 0
    for pixels, _ in real_batches(skipped):
        feats = encode(backbone, pixels, blocks, norm=norm)
        for b in blocks:
            moments[b].update(feats.tokens[b].reshape(-1, dim))
            position_sum[b] += feats.tokens[b].sum(dim=0, dtype=torch.float64)
        if use_cache:
            cache.append({b: feats.tokens[b] for b in blocks})
        done += pixels.shape[0]
        if progress:
            progress("real images", done, len(files))
    n_real = done
    skipped.warn()
    if n_real < 2:
        raise SoapvitError(f"--images: need at least 2 readable images, got {n_real}")

    pcs = {b: principal_components(moments[b]) for b in blocks}
    # responses are sign tests on float32 tokens: float32 projections suffice and cost half
    components = {b: pcs[b][1].float() for b in blocks}
    means = {b: moments[b].mean.float() for b in blocks}
    real = {b: ResponseCounts.zeros(grid, dim, device) for b in blocks}
    fake = {b: ResponseCounts.zeros(grid, dim, device) for b in blocks}

    # pass 2: responses of real (cached or re-encoded) and synthetic tokens
    real_tokens = iter(cache) if use_cache else (
        encode(backbone, pixels, blocks, norm=norm).tokens for pixels, _ in real_batches(None)
    )
    for batch in real_tokens:
        for b in blocks:
            real[b].update(batch[b], means[b], components[b])
    cache.clear()
    done = 0
    for pixels in synthetic.batches(batch_size, device):
        feats = encode(backbone, pixels, blocks, norm=norm)
        for b in blocks:
            fake[b].update(feats.tokens[b], means[b], components[b])
        done += pixels.shape[0]
        if progress:
            progress("synthetic images", done, synthetic.count)
    if synthetic.count and done == 0:
        raise SoapvitError("--synthetic produced no images")

    stats = {
        b: BlockStatistics(moments[b], pcs[b][0], pcs[b][1], real[b], fake[b], position_sum[b] / n_real)
        for b in blocks
    }
    report = FitReport(n_real=n_real, n_synthetic=done, skipped=skipped.files,
                       seconds=time.perf_counter() - start, cached=use_cache)
    return stats, report


def fit(
    backbone: Backbone,
    images: str | Path | Sequence[Path],
    *,
    limit: int | None = None,
    synthetic: int | None = None,
    generator: str = "mixture",
    blocks: int | str | Sequence[int] = "all",
    apply_layer: int = -1,
    image_size: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    seed: int = 0,
    norm: bool = True,
    config: SoapConfig | None = None,
    cache_gb: float = 8.0,
    num_workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[SoapHead, FitReport]:
    """Fit a SOAP head for ``backbone`` on a folder (searched recursively) or list of natural images.

    ``synthetic`` defaults to the number of real images; ``blocks`` are fitted (``"all"``,
    ``"last"`` or indices) and the projector is built for ``apply_layer`` (default the last).
    """
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    backbone = backbone.to(device).eval()
    files = list_images(images, limit, recursive=True) if isinstance(images, (str, Path)) else list(images)[:limit]
    block_ids = backbone.resolve_blocks(blocks)
    apply_id = backbone.resolve_blocks(apply_layer)[0]
    if apply_id not in block_ids:
        block_ids = sorted({*block_ids, apply_id})
    size = image_size or backbone.image_size
    transform = ImageTransform.for_backbone(backbone, size=size, mode="square")
    side = transform.output_size(1, 1)[0]
    n_synthetic = len(files) if synthetic is None else synthetic
    source = SyntheticImages(n_synthetic, side, generator, seed, backbone.image_mean, backbone.image_std)
    torch.manual_seed(seed)
    stats, report = collect_statistics(
        backbone, files, source, blocks=block_ids, transform=transform, batch_size=batch_size,
        device=device, norm=norm, cache_gb=cache_gb, num_workers=num_workers, progress=progress,
    )
    metadata = {
        "backbone": backbone.model_id, "layers": block_ids, "image_size": side, "norm": norm,
        "n_real": report.n_real, "n_synthetic": report.n_synthetic, "generator": generator, "seed": seed,
        "backbone_config": backbone.describe(), "soapvit_version": __version__,
    }
    head = SoapHead.from_statistics(stats, config or SoapConfig(), apply_id, metadata)
    return head, report
