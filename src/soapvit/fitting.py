"""Fitting corrections: the data passes that feed :mod:`stats` and then :mod:`corrections`.

Pass 1 encodes the real images once and accumulates the moments, per-position sums and token-norm
histograms of every requested block (tokens are cached when they fit in ``cache_gb``); pass 2
counts the responses of the real tokens (from the cache, else a second forward) and of the
synthetic images (their only forward). With the cache every image is encoded exactly once. Every
correction derivable from these statistics (SOAP, posmean, top-pc, …) is fitted from them; the
zero image is one more forward where a method asks for it; a calibrating method (registers) has
its own pass over the first real images.

Both passes scale out over a :mod:`torch.distributed` group (each rank its share of the real and
synthetic batches, accumulators merged across ranks) and resume from a :mod:`~soapvit.resume`
checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import __version__
from .backbones.base import BLOCK_FEATURES, EDITED_TOKENS, NORMS, Backbone
from .data.sources import ImageFiles, ImageSource, ImageStream, TarShards, is_stream, open_images
from .data.synthetic import GENERATORS, SyntheticImages
from .data.transforms import ImageTransform
from .errors import SoapvitError
from .corrections import METHODS, CorrectionSet, SoapConfig, SoapHead
from .features import PRECISIONS, encode, gather_log, iter_pixels, iter_tokens, resolve_device
from .resume import FitCheckpoint, FitState, align_stages
from .runlog import Progress, RunReport
from .stats import BlockStatistics, FitStatistics, principal_components
from .validation import COUNT, OPTIONAL_COUNT, Interval, Options, validate

DEVICE_CACHE_GB = 2.0
"""Beyond this size a GPU fit keeps its real-token cache in host memory (``device_cache_gb``)."""


def on_host(value):
    """``value`` with every tensor it holds moved to the CPU, in place where it is an object: a
    fitted correction (its attributes, a SOAP head's block decompositions), a dict, list or
    dataclass of them. Backbones and other modules are left alone."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, torch.nn.Module):
        return value
    if isinstance(value, dict):
        return {k: on_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(on_host(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            setattr(value, field.name, on_host(getattr(value, field.name)))
        return value
    if hasattr(value, "__dict__") and not isinstance(value, type) and type(value).__module__.startswith("soapvit."):
        for name, attribute in vars(value).items():
            setattr(value, name, on_host(attribute))
    return value


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
    norm: bool | str = EDITED_TOKENS,
    block_features: str = "residual",
    cache_gb: float = 8.0,
    device_cache_gb: float = DEVICE_CACHE_GB,
    precision: str = "bf16",
    num_workers: int | None = None,
    progress: Progress | None = None,
    checkpoint: FitCheckpoint | None = None,
    zero_image: bool = False,
) -> tuple[FitStatistics, FitReport]:
    """Run both passes over ``images`` (real) and ``synthetic``; per-block statistics and a report.

    In a :mod:`torch.distributed` group every process takes its share of both sets and the
    accumulators are merged across ranks (the same numbers on every rank, equal to one process's).
    With a ``checkpoint`` the state is saved every few batches and a saved state is resumed.
    ``zero_image`` adds the tokens of the image that is zero after normalisation (one forward).
    The real-token cache (up to ``cache_gb``) stays on the backbone's device up to
    ``device_cache_gb`` and in host memory beyond. ``precision``: ``bf16`` autocast on CUDA or
    ``fp32`` (:func:`~soapvit.features.encode`)."""
    device = backbone.device
    side = image_transform.output_size(1, 1)[0] // backbone.patch_size
    grid, dim = (side, side), backbone.embed_dim
    state = checkpoint.load(device) if checkpoint is not None else None
    resumed = state is not None
    if checkpoint is not None:
        state = align_stages(state or FitState.fresh(blocks, grid, dim, device))
    state = state or FitState.fresh(blocks, grid, dim, device)
    expected = images.limit if is_stream(images) else len(images)
    cache_bytes = None if expected is None else expected * side * side * dim * len(blocks) * 4
    use_cache = not resumed and cache_bytes is not None and cache_bytes <= cache_gb * 2**30
    host = torch.device("cpu")
    cache_device = device if use_cache and cache_bytes <= device_cache_gb * 2**30 else host
    start = time.perf_counter()

    def real_batches(stage: str, start_step: int):
        return iter_tokens(backbone, images, image_transform, blocks=blocks, norm=norm, block_features=block_features,
                           precision=precision, batch_size=batch_size, num_workers=num_workers, across_ranks=True,
                           start_step=start_step, log=state.log, progress=progress, stage=stage)

    def step_done(steps: int, attribute: str) -> None:
        setattr(state, attribute, steps)
        if checkpoint is not None:
            checkpoint.step_done(state)

    # pass 1: moments of the real tokens
    cache: list[tuple[int, bool, dict[int, Tensor]]] = []
    if state.stage == "moments":
        for batch in real_batches("real images", state.real_steps):
            tokens = batch.original.tokens
            for b in blocks:
                state.moments[b].update(tokens[b].reshape(-1, dim))
                state.position_sum[b] += tokens[b].sum(dim=0, dtype=torch.float64)
                state.norms[b].update(tokens[b])
            if use_cache:
                cache.append((batch.step, batch.ends_step, {b: tokens[b].to(cache_device) for b in blocks}))
            state.n_real += len(batch.indices)
            if batch.ends_step:
                step_done(batch.step + 1, "real_steps")
        state.finish_moments()
        if checkpoint is not None:
            checkpoint.save(state)
    if state.n_real < 2:
        raise SoapvitError(f"--images: need at least 2 readable images, got {state.n_real}")

    pcs = {b: principal_components(state.moments[b]) for b in blocks}
    # responses are sign tests on float32 tokens: float32 projections suffice and cost half
    components = {b: pcs[b][1].float() for b in blocks}
    means = {b: state.moments[b].mean.float() for b in blocks}

    # pass 2: responses of real (cached or re-encoded) and synthetic tokens
    if use_cache:
        real_tokens = iter(cache)
    else:
        real_tokens = ((batch.step, batch.ends_step, batch.original.tokens)
                       for batch in real_batches("real images (2nd pass)", state.real_steps))
    for step, ends_step, tokens in real_tokens:
        if step < state.real_steps:
            continue
        for b in blocks:
            state.real[b].update(tokens[b].to(device, non_blocking=True), means[b], components[b])
        if ends_step:
            step_done(step + 1, "real_steps")
    cache.clear()
    done = state.fake[blocks[0]].images
    for step, pixels in enumerate(synthetic.batches(batch_size, device, across_ranks=True,
                                                    start_step=state.synthetic_steps), state.synthetic_steps):
        feats = encode(backbone, pixels, blocks, norm=norm, block_features=block_features, precision=precision)
        for b in blocks:
            state.fake[b].update(feats.tokens[b], means[b], components[b])
        done += pixels.shape[0]
        step_done(step + 1, "synthetic_steps")
        if progress:
            progress("synthetic images", done, synthetic.count)
    real = {b: state.real[b].across_ranks() for b in blocks}
    fake = {b: state.fake[b].across_ranks() for b in blocks}
    if fake[blocks[0]].images == 0:
        raise SoapvitError("--synthetic produced no images")
    log = gather_log(state.log)

    stats = FitStatistics({
        b: BlockStatistics(state.moments[b], pcs[b][0], pcs[b][1], real[b], fake[b],
                           state.position_sum[b] / state.n_real, state.norms[b])
        for b in blocks
    }, grid)
    if zero_image:
        zeros = torch.zeros(1, 3, side * backbone.patch_size, side * backbone.patch_size, device=device)
        feats = encode(backbone, zeros, blocks, norm=norm, block_features=block_features, precision=precision)
        stats.zero_image = {b: feats.tokens[b][0] for b in blocks}
    report = FitReport(results={}, settings={}, log=log, seconds={"total": time.perf_counter() - start},
                       n_real=state.n_real, n_synthetic=fake[blocks[0]].images, cached=use_cache)
    return stats, report


FIT_CONSTRAINTS = {
    "limit": OPTIONAL_COUNT, "synthetic": OPTIONAL_COUNT, "image_size": OPTIONAL_COUNT, "batch_size": COUNT,
    "cache_gb": Interval(float, 0), "num_workers": Interval(int, 0, optional=True), "seed": Interval(int),
    "generator": Options(GENERATORS), "block_features": Options(BLOCK_FEATURES), "norm": Options(NORMS), "checkpoint_every": COUNT,
    "calibration_images": COUNT, "precision": Options(PRECISIONS),
}


def resolve_methods(methods: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma list or a sequence of method names → names in registry order, SOAP
    always first (every corrections file holds the SOAP decomposition)."""
    if isinstance(methods, str):
        methods = list(METHODS) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SoapvitError(f"--methods must be 'all' or a comma list of {', '.join(METHODS)}, not "
                           f"{','.join(methods)!r}")
    return [m for m in METHODS if m in methods or m == "soap"]


def resolve_images(images: str | Path | Sequence[Path] | ImageSource | ImageStream,
                   limit: int | None = None) -> ImageSource | ImageStream:
    """A folder (searched recursively), a file list, tar shards (see :func:`open_images`) or any
    iterable of image paths → a source; a source is returned as it is (``limit`` applies to the
    others)."""
    if isinstance(images, (str, Path)):
        return open_images(images, limit)
    if hasattr(images, "load"):  # an image source or stream (data.sources)
        return images
    if isinstance(images, Iterable):
        return ImageFiles([Path(p) for p in itertools.islice(images, limit)])
    raise SoapvitError(f"images must be a folder, a file list, tar shards, paths or an image source, not "
                       f"{type(images).__name__}")


def data_fingerprint(source: ImageSource | ImageStream) -> str:
    """A digest of the items a source names (shards and limit for :class:`TarShards`)."""
    if isinstance(source, TarShards):
        names = [*map(str, source.shards), f"limit={source.limit}"]
    elif is_stream(source):
        names = [type(source).__name__, f"limit={source.limit}"]
    else:
        names = [source.name(i) for i in range(len(source))]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:24]


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
    norm: bool | str = EDITED_TOKENS,
    block_features: str = "residual",
    precision: str = "bf16",
    config: SoapConfig | None = None,
    methods: str | Sequence[str] = ("soap",),
    method_options: dict[str, dict] | None = None,
    calibration_images: int = 256,
    cache_gb: float = 8.0,
    num_workers: int | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    progress: Progress | None = None,
) -> tuple[CorrectionSet, FitReport]:
    """Fit corrections for ``backbone`` on natural images (a folder, a file list or a source).

    ``methods`` (``"all"``, a comma list or names of :data:`~soapvit.corrections.METHODS`; SOAP
    always) are fitted from the same passes, each with its ``method_options`` (name →
    keyword arguments); a calibrating method uses the first ``calibration_images`` real images.
    With ``"all"`` a method that does not apply to this backbone (e.g. registers where no token
    has an outlier norm) is left out with a warning; a named one that fails is an error.

    ``synthetic`` defaults to the number of real images; ``blocks`` are fitted (``"all"``,
    ``"last"`` or indices) and the projector is built for ``apply_block`` (default the last).
    ``norm``: the default ``"last"`` gathers every block's tokens as a correction there edits
    them (the head rule: the final-norm output at the last block, the raw residual stream at an
    earlier one); ``True`` takes every block through the final norm (DINOv2's intermediate-layer
    convention, for a depth study; a correction so fitted at an earlier block is warned about
    where it is applied). ``block_features`` picks what a block's tokens are (see
    :meth:`~soapvit.backbones.base.Backbone.forward_features`); ``"branch"`` is for the depth
    sweep of the SOAP authors, not for a head to apply.

    Under ``torchrun`` (a :mod:`torch.distributed` group) the processes share the images and
    return the same head as one process. ``checkpoint``: a folder where the state is saved every
    ``checkpoint_every`` batches; rerunning the same fit resumes from it. ``precision``: ``bf16``
    (autocast on CUDA, the default) or ``fp32``; on the CPU both are float32.

    Every tensor of the returned corrections is on the CPU, whatever the device of the fit.
    """
    validate(locals(), FIT_CONSTRAINTS)
    names = resolve_methods(methods)
    method_options = dict(method_options or {})
    estimators = {n: METHODS[n](**method_options.get(n, {})) for n in names if n != "soap"}
    device = resolve_device(device)
    backbone = backbone.to(device).eval()
    source = resolve_images(images, limit)
    block_ids = backbone.resolve_blocks(blocks)
    apply_id = backbone.resolve_blocks(apply_block)[0]
    if apply_id not in block_ids:
        block_ids = sorted({*block_ids, apply_id})
    transform = ImageTransform.for_backbone(backbone, size=image_size or backbone.image_size, mode="square")
    side = transform.output_size(1, 1)[0]
    n_synthetic = synthetic if synthetic is not None else source.limit if is_stream(source) else len(source)
    if n_synthetic is None:
        raise SoapvitError("--synthetic: give a count when tar shards are read without --limit")
    fakes = SyntheticImages(n_synthetic, side, generator, seed, backbone.image_mean, backbone.image_std)
    saver = None
    if checkpoint is not None:
        saver = FitCheckpoint(checkpoint, checkpoint_every, {
            "backbone": backbone.model_id, "weights_digest": backbone.weights_digest(), "blocks": block_ids,
            "image_size": side, "norm": norm, "block_features": block_features, "images": data_fingerprint(source),
            "batch_size": batch_size, "synthetic": n_synthetic, "generator": generator, "precision": precision,
            "generator_version": fakes.version, "seed": seed})
    torch.manual_seed(seed)
    stats, report = collect_statistics(
        backbone, source, fakes, blocks=block_ids, image_transform=transform, batch_size=batch_size, norm=norm,
        block_features=block_features, cache_gb=cache_gb, precision=precision, num_workers=num_workers,
        progress=progress,
        checkpoint=saver, zero_image=any("zero_image" in e.requires for e in estimators.values()),
    )
    metadata = {
        "backbone": backbone.model_id, "weights_digest": backbone.weights_digest(), "blocks": block_ids,
        "image_size": side, "grid": [side // backbone.patch_size] * 2, "norm": norm,
        "block_features": block_features, "precision": precision,
        "n_real": report.n_real, "n_synthetic": report.n_synthetic, "generator": generator,
        "generator_version": fakes.version, "seed": seed,
        "backbone_config": backbone.describe(), "soapvit_version": __version__, **report.log.to_dict(),
    }
    if saver is not None and saver.resumed_from:
        metadata["resumed_from"] = saver.resumed_from  # the digest of the checkpointed state it continued
    head = SoapHead.from_statistics(stats, config or SoapConfig(), apply_id, metadata)
    corrections = {"soap": head}
    for name, estimator in estimators.items():
        try:
            if estimator.calibrates:
                t0 = time.perf_counter()
                pixels = iter_pixels(source, transform, range(min(calibration_images, report.n_real)), batch_size,
                                     device, num_workers=num_workers, log=report.log)
                corrections[name] = estimator.calibrate(backbone, pixels, apply_id)
                report.seconds[f"calibrate {name}"] = time.perf_counter() - t0
            else:
                corrections[name] = estimator.fit(stats, apply_id)
        except SoapvitError as err:
            if methods != "all":
                raise
            report.log.warn(f"--methods all: {name} left out of the file: {err}")
    metadata = {**head.metadata, "methods": list(corrections), **report.log.to_dict()}
    report.settings = {k: v for k, v in metadata.items() if k not in ("skipped", "warnings")}
    report.results = head.summary()
    corrections = {name: on_host(correction) for name, correction in corrections.items()}  # save, plots: CPU
    return CorrectionSet(corrections, metadata), report
