"""Warp consistency: a label-free positional-bias test of patch tokens.

For each real image (resized to a square of side ``S``) a second view is made by a known warp,
an axis-aligned affine map ``x' = a_x·x + b_x``, ``y' = a_y·y + b_y`` of pixel coordinates
(``flip``: horizontal mirror; ``shift``: translation, uncovered pixels black; ``crop``: a random
crop resized back to ``S``; ``scale``: the image shrunk into the centre on black). Each patch of
view A whose centre maps inside view B is matched to its cosine nearest neighbour among B's
patches (last-block tokens); the known map gives where it should land.

- **PCK@α**: share of those patches whose matched B patch centre lies within ``α·S`` of the
  mapped centre (α ∈ {0.05, 0.1}).
- **same-position rate**: among the patches whose mapped centre falls in *another* grid cell than
  their own, the share whose match is their own cell: the match followed the position, not the
  content. Positional artifacts raise it; a good correction lowers it and raises PCK.

Dataset figures pool the patches of all images (sums of hits over sums of counts); the paired
bootstrap (:func:`warp_intervals`) resamples images and recomputes the pooled ratios for both
variants on each draw.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import distributed
from ..backbones.base import Backbone
from ..data.sources import ImageSource, is_stream
from ..data.transforms import ImageTransform
from ..errors import SoapvitError
from ..features import gather_log, iter_tokens
from ..runlog import Progress, RunLog, RunReport
from .intervals import DEFAULTS, bootstrap_settings, paired_interval
from .variants import describe_variant, plan_variants

WARPS = ("crop", "shift", "flip", "scale")
ALPHAS = (0.05, 0.1)
METRICS = ("pck@0.05", "pck@0.1", "same_position")


@dataclass(frozen=True)
class Warp:
    """``x' = ax·x + bx``, ``y' = ay·y + by`` in pixels of the ``S × S`` view."""

    kind: str
    ax: float
    bx: float
    ay: float
    by: float

    def apply(self, image: Image.Image) -> Image.Image:
        """View B of the square view A (PIL's affine transform maps output to input coordinates)."""
        data = (1 / self.ax, 0, -self.bx / self.ax, 0, 1 / self.ay, -self.by / self.ay)
        return image.transform(image.size, Image.Transform.AFFINE, data, resample=Image.Resampling.BICUBIC,
                               fillcolor=(0, 0, 0))

    def map(self, xy: np.ndarray) -> np.ndarray:
        return np.stack([self.ax * xy[..., 0] + self.bx, self.ay * xy[..., 1] + self.by], -1)


def make_warp(kind: str, side: int, rng: np.random.Generator) -> Warp:
    """A random warp of ``kind`` for an ``side × side`` view."""
    if kind == "flip":
        return Warp(kind, -1.0, float(side), 1.0, 0.0)
    if kind == "shift":
        dx, dy = rng.uniform(0.15, 0.35, 2) * side * rng.choice([-1, 1], 2)
        return Warp(kind, 1.0, float(dx), 1.0, float(dy))
    if kind == "crop":
        c = rng.uniform(0.5, 0.8) * side
        x0, y0 = rng.uniform(0, side - c, 2)
        return Warp(kind, side / c, -x0 * side / c, side / c, -y0 * side / c)
    if kind == "scale":
        s = rng.uniform(0.5, 0.8)
        return Warp(kind, s, (1 - s) * side / 2, s, (1 - s) * side / 2)
    raise SoapvitError(f"--warps: unknown warp {kind!r} (one of {', '.join(WARPS)})")


@dataclass
class WarpedViews:
    """Item ``2i`` is image ``i`` of ``source`` resized to ``side²`` (view A), item ``2i + 1`` its
    warped view B; the target of both is the image's :class:`Warp` (kinds cycle per image, the
    parameters are seeded per image)."""

    source: ImageSource
    side: int
    kinds: Sequence[str] = WARPS
    seed: int = 0

    def __len__(self) -> int:
        return 2 * len(self.source)

    def name(self, index: int) -> str:
        return self.source.name(index // 2) + (" (warped)" if index % 2 else "")

    def image_size(self, index: int) -> tuple[int, int]:
        return self.side, self.side

    def warp(self, image_index: int) -> Warp:
        rng = np.random.default_rng([self.seed, image_index])
        return make_warp(self.kinds[image_index % len(self.kinds)], self.side, rng)

    def load(self, index: int):
        image, _ = self.source.load(index // 2)
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image.permute(1, 2, 0).numpy())
        view = image.convert("RGB").resize((self.side, self.side), Image.Resampling.BICUBIC)
        warp = self.warp(index // 2)
        return (warp.apply(view) if index % 2 else view), warp


def match_scores(tokens_a: torch.Tensor, tokens_b: torch.Tensor, warp: Warp, side: int) -> dict[str, int]:
    """Counts of one image pair: ``valid``, PCK hits per α, ``moved`` (valid patches whose mapped
    centre is in another cell) and ``same`` (of those, matched to their own cell)."""
    h, w, d = tokens_a.shape
    cell = side / w, side / h
    a = F.normalize(tokens_a.reshape(-1, d).float(), dim=-1)
    b = F.normalize(tokens_b.reshape(-1, d).float(), dim=-1)
    match = (a @ b.T).argmax(1).cpu().numpy()
    rows, cols = np.divmod(np.arange(h * w), w)
    centres = np.stack([(cols + 0.5) * cell[0], (rows + 0.5) * cell[1]], -1)
    target = warp.map(centres)
    valid = (target[:, 0] >= 0) & (target[:, 0] < side) & (target[:, 1] >= 0) & (target[:, 1] < side)
    matched = centres[match]
    dist = np.linalg.norm(matched - target, axis=-1)
    target_cell = np.floor(target[:, 1] / cell[1]).astype(int) * w + np.floor(target[:, 0] / cell[0]).astype(int)
    moved = valid & (target_cell != np.arange(h * w))
    counts = {"valid": int(valid.sum()), "moved": int(moved.sum()), "same": int((moved & (match == np.arange(h * w))).sum())}
    for alpha in ALPHAS:
        counts[f"pck@{alpha}"] = int((valid & (dist <= alpha * side)).sum())
    return counts


@dataclass
class WarpMetrics:
    counts: dict[int, dict[str, int]] = field(default_factory=dict)  # image index → counts

    def merge(self, other: WarpMetrics) -> WarpMetrics:
        self.counts.update(other.counts)
        return self

    def arrays(self, indices=None) -> dict[str, np.ndarray]:
        keys = sorted(self.counts) if indices is None else list(indices)
        names = ["valid", "moved", "same", *(f"pck@{a}" for a in ALPHAS)]
        return {n: np.array([self.counts[i][n] for i in keys], dtype=np.float64) for n in names}

    def result(self) -> dict:
        a = self.arrays()
        return {**{m: 100.0 * v for m, v in _pooled(a).items()}, "n_images": len(self.counts),
                "n_patches": int(a["valid"].sum())}


def _pooled(a: dict[str, np.ndarray], idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pooled ratios (fractions) over the images ``idx (..., n)`` (all when None)."""
    take = (lambda v: v) if idx is None else (lambda v: v[idx])
    valid, moved = take(a["valid"]).sum(-1), take(a["moved"]).sum(-1)
    out = {f"pck@{al}": take(a[f"pck@{al}"]).sum(-1) / np.maximum(valid, 1) for al in ALPHAS}
    out["same_position"] = take(a["same"]).sum(-1) / np.maximum(moved, 1)
    return out


def warp_intervals(metrics: dict[str, WarpMetrics], **options) -> dict:
    """Per variant other than ``original``: paired intervals of each metric's difference (points)."""
    options = {**DEFAULTS, **options}
    base, out = metrics["original"], {}
    for name, m in metrics.items():
        if name == "original":
            continue
        common = sorted(set(base.counts) & set(m.counts))
        a, b = base.arrays(common), m.arrays(common)
        out[name] = {key: paired_interval(lambda idx, key=key: 100 * (_pooled(b, idx)[key] - _pooled(a, idx)[key]),
                                          len(common), **options) for key in METRICS}
    return out


@dataclass
class WarpConfig:
    image_size: int | None = None  # the square side; None → the backbone's resolution
    warps: tuple[str, ...] = WARPS
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.warps = tuple(self.warps)
        unknown = [k for k in self.warps if k not in WARPS]
        if unknown or not self.warps:
            raise SoapvitError(f"--warps: {', '.join(unknown) or 'none given'} (choose from {', '.join(WARPS)})")
        if self.batch_size < 1:
            raise SoapvitError("--batch-size must be at least 1")


@dataclass
class WarpReport(RunReport):
    intervals: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)
    passes: dict = field(default_factory=dict)

    kind = "warp"


def evaluate_warp(backbone: Backbone, source: ImageSource, *, corrections: Mapping | None = None,
                  config: WarpConfig | None = None, num_workers: int | None = None,
                  progress: Progress | None = None) -> WarpReport:
    """Warp consistency of ``source``'s images for the original tokens and every correction's variant."""
    config = config or WarpConfig()
    if is_stream(source):
        raise SoapvitError("--images: warp consistency reads an image folder or a file list, not tar shards")
    log = RunLog()
    corrections, passes = plan_variants(corrections, backbone, reads_keys=False, log=log)
    side = ImageTransform.for_backbone(backbone, size=config.image_size or backbone.image_size).output_size(1, 1)[0]
    views = WarpedViews(source, side, config.warps, config.seed)
    transform = ImageTransform.for_backbone(backbone, size=side, mode="square")
    block = backbone.num_blocks - 1
    pending: dict[int, dict[str, torch.Tensor]] = {}
    metrics: dict[str, WarpMetrics] = {}
    start = time.perf_counter()
    for batch in iter_tokens(backbone, views, transform, blocks=block, corrections=corrections,
                             batch_size=2 * config.batch_size, num_workers=num_workers, across_ranks=True, log=log,
                             progress=progress, stage="warp consistency"):
        for i, (index, warp) in enumerate(zip(batch.indices, batch.targets)):
            pending[index] = {v: f.tokens[block][i] for v, f in batch.variants.items()}
            pair = index // 2
            if 2 * pair in pending and 2 * pair + 1 in pending:
                a, b = pending.pop(2 * pair), pending.pop(2 * pair + 1)
                for v in a:
                    metrics.setdefault(v, WarpMetrics()).counts[pair] = match_scores(a[v], b[v], warp, side)
    metrics_all: dict[str, WarpMetrics] = {}
    for part in distributed.all_gather_objects(metrics):
        for name, m in part.items():
            metrics_all[name] = metrics_all[name].merge(m) if name in metrics_all else m
    log = gather_log(log)
    if "original" not in metrics_all:
        raise SoapvitError(f"--images: no image could be evaluated; first problems: {'; '.join(log.lines()[:3])}")
    seconds = {"total": time.perf_counter() - start}
    names = ["original", *corrections]
    return WarpReport(
        results={n: metrics_all[n].result() for n in names},
        settings={"image_size": side, "warps": list(config.warps), "seed": config.seed, "alphas": list(ALPHAS),
                  "model": backbone.model_id, "device": str(backbone.device), "block": block,
                  "variants": {n: describe_variant(c) for n, c in corrections.items()},
                  "bootstrap": bootstrap_settings()},
        log=log, seconds=seconds, intervals=warp_intervals({n: metrics_all[n] for n in names}),
        per_image={n: {"index": sorted(metrics_all[n].counts),
                       "counts": [metrics_all[n].counts[i] for i in sorted(metrics_all[n].counts)],
                       "warp": [views.warp(i).__dict__ for i in sorted(metrics_all[n].counts)]} for n in names},
        passes=passes)

