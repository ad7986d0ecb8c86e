"""Fitting a SOAP head: the data passes that feed :mod:`stats` and then :mod:`soap`.

Pass 1 encodes the real images once and accumulates the moments of every requested block
(tokens are cached when they fit in ``cache_gb``); pass 2 counts the responses of
the real tokens (from the cache, else a second forward) and of the synthetic images (their only
forward). With the cache every image is encoded exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import __version__
from .backbones.base import Backbone
from .data.images import list_images
from .data.sources import ImageFiles, ImageSource
from .data.synthetic import GENERATORS, SyntheticImages
from .data.transforms import ImageTransform
from .errors import SoapvitError
from .features import encode, iter_tokens, resolve_device
from .runlog import Progress, RunLog, RunReport
from .soap import BlockStatistics, SoapConfig, SoapHead
from .stats import ResponseCounts, StreamingMoments, principal_components
from .validation import COUNT, OPTIONAL_COUNT, Interval, Options, validate


@dataclass
class FitReport(RunReport):
    """What a fit did: counts, whether real tokens were cached between the passes, the log."""

    n_real: int = 0
    n_synthetic: int = 0
    cached: bool = True

    kind = "fit"

    @property
    def images_per_second(self) -> float:
        return (self.n_real + self.n_synthetic) / max(self.seconds.get("total", 0.0), 1e-9)


def collect_statistics(
    backbone: Backbone,
    images: ImageSource,
    synthetic: SyntheticImages,
    *,
    blocks: Sequence[int],
    image_transform: ImageTransform,
    batch_size: int = 32,
    norm: bool = True,
    cache_gb: float = 8.0,
    num_workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[dict[int, BlockStatistics], FitReport]:
    """Run both passes over ``images`` (real) and ``synthetic``; per-block statistics and a report."""
    device = backbone.device
    side = image_transform.output_size(1, 1)[0] // backbone.patch_size
    grid, dim = (side, side), backbone.embed_dim
    cache_bytes = len(images) * side * side * dim * len(blocks) * 4
    use_cache = cache_bytes <= cache_gb * 2**30
    log = RunLog()
    start = time.perf_counter()

    def real_batches(stage: str):
        return iter_tokens(backbone, images, image_transform, blocks=blocks, norm=norm, batch_size=batch_size,
                           num_workers=num_workers, log=log, progress=progress, stage=stage)

    # pass 1: moments of the real tokens
    moments = {b: StreamingMoments(dim, device) for b in blocks}
    position_sum = {b: torch.zeros(*grid, dim, dtype=torch.float64, device=device) for b in blocks}
    cache: list[dict[int, Tensor]] = []
    n_real = 0
    for batch in real_batches("real images"):
        tokens = batch.original.tokens
        for b in blocks:
            moments[b].update(tokens[b].reshape(-1, dim))
            position_sum[b] += tokens[b].sum(dim=0, dtype=torch.float64)
        if use_cache:
            cache.append(tokens)
        n_real += len(batch.indices)
    if n_real < 2:
        raise SoapvitError(f"--images: need at least 2 readable images, got {n_real}")

    pcs = {b: principal_components(moments[b]) for b in blocks}
    # responses are sign tests on float32 tokens: float32 projections suffice and cost half
    components = {b: pcs[b][1].float() for b in blocks}
    means = {b: moments[b].mean.float() for b in blocks}
    real = {b: ResponseCounts.zeros(grid, dim, device) for b in blocks}
    fake = {b: ResponseCounts.zeros(grid, dim, device) for b in blocks}

    # pass 2: responses of real (cached or re-encoded) and synthetic tokens
    real_tokens = iter(cache) if use_cache else (batch.original.tokens for batch in real_batches("real images (2nd pass)"))
    for tokens in real_tokens:
        for b in blocks:
            real[b].update(tokens[b], means[b], components[b])
    cache.clear()
    done = 0
    for pixels in synthetic.batches(batch_size, device):
        feats = encode(backbone, pixels, blocks, norm=norm)
        for b in blocks:
            fake[b].update(feats.tokens[b], means[b], components[b])
        done += pixels.shape[0]
        if progress:
            progress("synthetic images", done, synthetic.count)
    if done == 0:
        raise SoapvitError("--synthetic produced no images")

    stats = {
        b: BlockStatistics(moments[b], pcs[b][0], pcs[b][1], real[b], fake[b], position_sum[b] / n_real)
        for b in blocks
    }
    report = FitReport(results={}, settings={}, log=log, seconds={"total": time.perf_counter() - start},
                       n_real=n_real, n_synthetic=done, cached=use_cache)
    return stats, report


FIT_CONSTRAINTS = {
    "limit": OPTIONAL_COUNT, "synthetic": OPTIONAL_COUNT, "image_size": OPTIONAL_COUNT, "batch_size": COUNT,
    "cache_gb": Interval(float, 0), "num_workers": Interval(int, 0, optional=True), "seed": Interval(int),
    "generator": Options(GENERATORS),
}


def resolve_images(images: str | Path | Sequence[Path] | ImageSource, limit: int | None = None) -> ImageSource:
    """A folder (searched recursively) or a list of files → an :class:`ImageFiles` source; a source
    is returned as it is (``limit`` applies to folders and lists)."""
    if isinstance(images, (str, Path)):
        return ImageFiles(list_images(images, limit, recursive=True))
    if isinstance(images, Sequence):
        return ImageFiles(list(images)[:limit])
    return images


def fit(
    backbone: Backbone,
    images: str | Path | Sequence[Path] | ImageSource,
    *,
    limit: int | None = None,
    synthetic: int | None = None,
    generator: str = "mixture",
    blocks: int | str | Sequence[int] = "all",
    apply_block: int = -1,
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
    """Fit a SOAP head for ``backbone`` on natural images (a folder, a file list or a source).

    ``synthetic`` defaults to the number of real images; ``blocks`` are fitted (``"all"``,
    ``"last"`` or indices) and the projector is built for ``apply_block`` (default the last).
    """
    validate(locals(), FIT_CONSTRAINTS)
    device = resolve_device(device)
    backbone = backbone.to(device).eval()
    source = resolve_images(images, limit)
    block_ids = backbone.resolve_blocks(blocks)
    apply_id = backbone.resolve_blocks(apply_block)[0]
    if apply_id not in block_ids:
        block_ids = sorted({*block_ids, apply_id})
    transform = ImageTransform.for_backbone(backbone, size=image_size or backbone.image_size, mode="square")
    side = transform.output_size(1, 1)[0]
    n_synthetic = len(source) if synthetic is None else synthetic
    fakes = SyntheticImages(n_synthetic, side, generator, seed, backbone.image_mean, backbone.image_std)
    torch.manual_seed(seed)
    stats, report = collect_statistics(
        backbone, source, fakes, blocks=block_ids, image_transform=transform, batch_size=batch_size, norm=norm,
        cache_gb=cache_gb, num_workers=num_workers, progress=progress,
    )
    metadata = {
        "backbone": backbone.model_id, "weights_digest": backbone.weights_digest(), "blocks": block_ids,
        "image_size": side, "grid": [side // backbone.patch_size] * 2, "norm": norm,
        "n_real": report.n_real, "n_synthetic": report.n_synthetic, "generator": generator,
        "generator_version": fakes.version, "seed": seed,
        "backbone_config": backbone.describe(), "soapvit_version": __version__, **report.log.to_dict(),
    }
    head = SoapHead.from_statistics(stats, config or SoapConfig(), apply_id, metadata)
    report.settings = {k: v for k, v in metadata.items() if k not in ("skipped", "warnings")}
    report.results = head.summary()
    return head, report
