"""TokenCut over a salient-object or object-box dataset: the original tokens and every
correction's variant, from one pass where a variant maps the output, each scored per image with
paired intervals.

Two protocols, named in the report: ``tokencut`` (Wang et al., CVPR 2022: last-block keys,
τ = 0.2, ε = 1e-5) and ``soap`` (the SOAP authors' evaluation: block-output tokens, τ = 0.3; the
default). An explicit ``features`` or ``tau`` overrides the protocol's.

Besides the salient metrics (saliency sets), every image gets single-object discovery: the box
of the seed's component and CorLoc (:mod:`.discovery`), against boxes from the ground-truth mask
(``gt_boxes``: its connected components or its bounding box) or the dataset's own boxes (VOC,
COCO: CorLoc only).

Images are grouped by input size so that every batch is one backbone forward and one batched
TokenCut solve. Per image the patch mask is upsampled (nearest) to the original size, optionally
refined by the bilateral solver (its soft output is what TokenCut scores), and scored against
the mask. An unreadable image or mask is skipped with its reason; nothing else stops the run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .. import distributed
from ..backbones.base import Backbone
from ..data.boxes import BoxDataset
from ..data.saliency import SaliencyDataset
from ..data.transforms import MODES, RESAMPLING, ImageTransform
from ..errors import SoapvitError
from ..features import gather_log, iter_tokens
from ..runlog import Progress, RunLog, RunReport
from ..validation import COUNT, OPTIONAL_COUNT, POSITIVE, Interval, Options, validate
from .bilateral import BilateralParams, bilateral_solve
from .discovery import GT_BOXES, CorLocMetrics, boxes_from_mask, corloc_intervals, mask_box
from .intervals import against_original, bootstrap_settings
from .metrics import SalientMetrics, across_ranks, salient_scores, to_uint8
from .tokencut import tokencut_masks, upsample_nearest
from .variants import describe_variant, plan_variants

FEATURES = ("tokens", "keys")
SOLVERS = ("lanczos", "eigh")
DEFAULT_TAU = {"tokens": 0.3, "keys": 0.2}  # SOAP's evaluation / TokenCut
PROTOCOLS = {"tokencut": {"features": "keys", "tau": 0.2, "eps": 1e-5},  # Wang et al., CVPR 2022
             "soap": {"features": "tokens", "tau": 0.3, "eps": 1e-5}}  # the SOAP authors' evaluation
CONSTRAINTS = {
    "protocol": Options(tuple(PROTOCOLS)), "features": Options(FEATURES, optional=True), "gt_boxes": Options(GT_BOXES), "tau": Interval(float, 0, 1, open_low=True, open_high=True, optional=True),
    "eps": POSITIVE, "resize": Options(MODES), "image_size": OPTIONAL_COUNT, "resample": Options(tuple(RESAMPLING)),
    "solver": Options(SOLVERS), "batch_size": COUNT,
}


@dataclass
class TokenCutConfig:
    """Defaults reproduce the reference figures of the SOAP evaluation (``protocol="soap"``):
    output tokens, τ = 0.3, Lanczos resize of each side to its nearest patch multiple, no solver.
    ``features``/``tau``/``eps`` left None take the protocol's (``tau`` that of the features
    when only ``features`` is given)."""

    protocol: str = "soap"
    features: str | None = None  # None → the protocol's
    tau: float | None = None  # None → the protocol's, or DEFAULT_TAU[features] when features are given
    eps: float | None = None
    gt_boxes: str = "components"  # CorLoc boxes from a mask: its connected components or its bbox
    bilateral: bool = False
    resize: str = "aspect"  # "aspect" (TokenCut) or "square" (fixed size)
    image_size: int | None = None  # aspect: shorter side (None: keep); square: the side
    resample: str = "lanczos"
    solver: str = "lanczos"
    batch_size: int = 8

    def __post_init__(self) -> None:
        validate({k: v for k, v in self.__dict__.items() if k != "eps" or v is not None}, CONSTRAINTS)
        chosen = PROTOCOLS[self.protocol]
        if self.tau is None:
            self.tau = chosen["tau"] if self.features in (None, chosen["features"]) else DEFAULT_TAU[self.features]
        if self.features is None:
            self.features = chosen["features"]
        if self.eps is None:
            self.eps = chosen["eps"]
        if self.resize == "square" and not self.image_size:
            raise SoapvitError("--resize square needs --image-size")

    def image_transform(self, backbone: Backbone) -> ImageTransform:
        return ImageTransform.for_backbone(backbone, size=self.image_size, mode=self.resize, resample=self.resample)


@dataclass
class Example:
    """One image kept for the comparison figure."""

    stem: str
    image: np.ndarray
    ground_truth: np.ndarray
    predictions: dict[str, np.ndarray]


@dataclass
class TokenCutReport(RunReport):
    """Metrics per variant (``original`` and one per correction; ``…/raw`` = before the solver
    when it is on), per-image scores, and each variant's paired interval against ``original``."""

    intervals: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)
    passes: dict = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)

    kind = "tokencut"
    private_fields = ("examples",)

    @property
    def images_per_second(self) -> float:
        n = max((r["n_images"] for r in self.results.values()), default=0)
        return n / max(self.seconds.get("total", 0.0), 1e-9)


class _ExampleKeeper:
    """Keeps the ``n`` images where the original mask and the first correction's differ most in
    IoU (the first ``n`` images without a correction)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[tuple[float, int, Example]] = []

    def offer(self, score: float, order: int, example_factory) -> None:
        """Keep the example when it is among the ``n`` best by score, then by lower ``order`` (the
        choice does not depend on the order of the offers)."""
        if len(self.items) < self.n or (-score, order) < (-self.items[-1][0], self.items[-1][1]):
            self.items.append((score, order, example_factory()))
            self.items.sort(key=lambda t: (-t[0], t[1]))
            del self.items[self.n :]

    def across_ranks(self) -> _ExampleKeeper:
        """The ``n`` best examples of every rank's keeper (order: the dataset index)."""
        merged = _ExampleKeeper(self.n)
        for part in distributed.all_gather_objects(self.items):
            for score, order, example in part:
                merged.offer(score, order, lambda example=example: example)
        return merged

    def examples(self) -> list[Example]:
        return [e for _, _, e in sorted(self.items, key=lambda t: t[1])]


def evaluate_tokencut(
    backbone: Backbone,
    dataset: SaliencyDataset | BoxDataset,
    *,
    corrections: Mapping | None = None,
    config: TokenCutConfig | None = None,
    save_masks: str | Path | None = None,
    n_examples: int = 4,
    num_workers: int | None = None,
    progress: Progress | None = None,
) -> TokenCutReport:
    """Run TokenCut on every sample, for the original tokens and for each of ``corrections``
    (name → fitted correction, already checked against the backbone): a correction at the last
    block maps the output of the same pass, one at an earlier block (or one that edits the
    forward pass) has its own pass. With ``--features keys`` the output maps are left out.

    Under torchrun each process scores its share of the images; metrics, examples and the log are
    merged across ranks (every rank returns the same report).

    ``save_masks``: write each scored prediction as an 8-bit PNG named by image stem (original
    in the folder itself, the other variants in a subfolder named after them).
    """
    config = config or TokenCutConfig()
    block = backbone.num_blocks - 1
    log = RunLog()
    has_masks = not isinstance(dataset, BoxDataset)
    for path in dataset.missing:
        log.skip(str(path), "no mask with this stem" if has_masks else "no box for this image")
    corrections, passes = plan_variants(corrections, backbone, reads_keys=config.features == "keys", log=log)
    compared = next(iter(corrections), None)
    metrics: dict[str, SalientMetrics] = {}
    corloc: dict[str, CorLocMetrics] = {}
    keeper = _ExampleKeeper(n_examples)
    params = BilateralParams()
    seconds = {"read_and_encode": 0.0, "tokencut": 0.0, "bilateral": 0.0}
    start = time.perf_counter()
    batches = iter_tokens(backbone, dataset, config.image_transform(backbone), blocks=block, corrections=corrections,
                          keys=config.features == "keys", batch_size=config.batch_size, num_workers=num_workers,
                          keep_images=True, across_ranks=True, log=log, progress=progress, stage="tokencut")
    t0 = time.perf_counter()
    for batch in batches:
        t1 = time.perf_counter()
        seconds["read_and_encode"] += t1 - t0
        patch_masks = {}
        for v, feats in batch.variants.items():
            grid = feats.keys if config.features == "keys" else feats.tokens[block]
            patch_masks[v] = tokencut_masks(grid, config.tau, config.eps, method=config.solver).masks.cpu()
        seconds["tokencut"] += time.perf_counter() - t1
        for i, (index, image, target) in enumerate(zip(batch.indices, batch.images, batch.targets)):
            stem = dataset.samples[index].stem
            if has_masks:
                mask, size, gt_boxes = target, target.shape, boxes_from_mask(target, config.gt_boxes)
            else:
                mask, size, gt_boxes = None, (image.height, image.width), target
            preds = {}
            for v in patch_masks:
                full = upsample_nearest(patch_masks[v][i : i + 1], size)[0].numpy()
                corloc.setdefault(v, CorLocMetrics()).add(index, mask_box(full), gt_boxes)
                if not has_masks:
                    continue
                if config.bilateral:
                    metrics.setdefault(f"{v}/raw", SalientMetrics()).add(full, mask, index)
                    t2 = time.perf_counter()
                    preds[v] = to_uint8(bilateral_solve(np.asarray(image), full.astype(np.float64), params))
                    seconds["bilateral"] += time.perf_counter() - t2
                else:
                    preds[v] = to_uint8(full)
                metrics.setdefault(v, SalientMetrics()).add(preds[v], mask, index)
                if save_masks is not None:
                    folder = Path(save_masks) / ("" if v == "original" else v)
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(preds[v]).save(folder / f"{stem}.png")
            if not has_masks:
                continue
            if compared is not None:
                diff = abs(salient_scores(preds[compared], mask).iou - salient_scores(preds["original"], mask).iou)
            else:
                diff = -index
            keeper.offer(diff, index, lambda: Example(stem, np.asarray(image), mask, dict(preds)))
        t0 = time.perf_counter()
    seconds["total"] = time.perf_counter() - start
    metrics, log, keeper = across_ranks(metrics), gather_log(log), keeper.across_ranks()
    corloc = across_ranks(corloc)
    if "original" not in corloc:
        raise SoapvitError(f"no image could be evaluated; first problems: {'; '.join(log.lines()[:3])}")
    settings = {**config.__dict__, "model": backbone.model_id, "device": str(backbone.device),
                "variants": {name: describe_variant(c) for name, c in corrections.items()},
                "bootstrap": bootstrap_settings(), "n_images": len(dataset),
                "targets": "masks" if has_masks else dataset.source,
                "corloc_boxes": f"mask {config.gt_boxes}" if has_masks else f"{dataset.source} boxes"}
    order = ["original", *corrections]
    order_key = lambda name: (name.endswith("/raw"), order.index(name.split("/")[0]))  # noqa: E731
    names = sorted(set(metrics) | set(corloc), key=order_key)
    t0 = time.perf_counter()
    intervals = against_original({n: metrics[n] for n in names if n in metrics}) if metrics else {}
    for name, ci in corloc_intervals(corloc).items():
        intervals.setdefault(name, {}).update(ci)
    seconds["intervals"] = time.perf_counter() - t0
    results, per_image = {}, {}
    for n in names:
        results[n] = metrics[n].result() if n in metrics else {}
        per_image[n] = metrics[n].per_image() if n in metrics else {}
        if n in corloc:
            results[n] = {**results[n], **corloc[n].result()}
            per_image[n]["corloc"] = corloc[n].per_image()
    return TokenCutReport(results=results, settings=settings, log=log, seconds=seconds, intervals=intervals,
                          per_image=per_image, passes=passes, examples=keeper.examples())

