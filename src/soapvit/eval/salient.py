"""TokenCut over a salient-object dataset, original and SOAP-corrected features from one pass.

Images are grouped by input size so that every batch is one backbone forward and one batched
TokenCut solve. Per image the patch mask is upsampled (nearest) to the original size, optionally
refined by the bilateral solver (its soft output is what TokenCut scores), and scored against
the mask. An unreadable image or mask is skipped with its reason; nothing else stops the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .. import distributed
from ..backbones.base import Backbone
from ..data.saliency import SaliencyDataset
from ..data.transforms import MODES, RESAMPLING, ImageTransform
from ..errors import SoapvitError
from ..features import gather_log, iter_tokens
from ..runlog import Progress, RunLog, RunReport
from ..soap import SoapHead
from ..validation import COUNT, OPTIONAL_COUNT, POSITIVE, Interval, Options, validate
from .bilateral import BilateralParams, bilateral_solve
from .metrics import SalientMetrics, across_ranks, salient_scores, to_uint8
from .tokencut import tokencut_masks, upsample_nearest

FEATURES = ("tokens", "keys")
SOLVERS = ("lanczos", "eigh")
VARIANT_ORDER = ("original", "soap", "positional")
DEFAULT_TAU = {"tokens": 0.3, "keys": 0.2}  # SOAP's evaluation / TokenCut
CONSTRAINTS = {
    "features": Options(FEATURES), "tau": Interval(float, 0, 1, open_low=True, open_high=True, optional=True),
    "eps": POSITIVE, "resize": Options(MODES), "image_size": OPTIONAL_COUNT, "resample": Options(tuple(RESAMPLING)),
    "solver": Options(SOLVERS), "batch_size": COUNT,
}


@dataclass
class TokenCutConfig:
    """Defaults reproduce the reference figures of the SOAP evaluation: output tokens, τ = 0.3,
    Lanczos resize of each side to its nearest patch multiple, no solver."""

    features: str = "tokens"
    tau: float | None = None  # None → DEFAULT_TAU[features]
    eps: float = 1e-5
    bilateral: bool = False
    resize: str = "aspect"  # "aspect" (TokenCut) or "square" (fixed size)
    image_size: int | None = None  # aspect: shorter side (None: keep); square: the side
    resample: str = "lanczos"
    solver: str = "lanczos"
    batch_size: int = 8

    def __post_init__(self) -> None:
        validate(self.__dict__, CONSTRAINTS)
        if self.tau is None:
            self.tau = DEFAULT_TAU[self.features]
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
    """Metrics per variant (``original``, ``soap``; ``…/raw`` = before the solver when it is on)."""

    examples: list[Example] = field(default_factory=list)

    kind = "tokencut"
    private_fields = ("examples",)

    @property
    def images_per_second(self) -> float:
        n = max((r["n_images"] for r in self.results.values()), default=0)
        return n / max(self.seconds.get("total", 0.0), 1e-9)


class _ExampleKeeper:
    """Keeps the ``n`` images where original and SOAP masks differ most in IoU (the first ``n``
    images without a head)."""

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
    dataset: SaliencyDataset,
    *,
    head: SoapHead | None = None,
    config: TokenCutConfig | None = None,
    save_masks: str | Path | None = None,
    n_examples: int = 4,
    num_workers: int | None = None,
    progress: Progress | None = None,
) -> TokenCutReport:
    """Run TokenCut on every sample; with a head, also on SOAP-corrected features of the same pass
    (a head at an earlier block is propagated through the later blocks, keys included).

    With a head and output tokens, the positional baseline (tokens minus the per-position offset
    the fit measured, :func:`~soapvit.features.subtract_position`) is scored too, as
    ``positional``.

    Under torchrun each process scores its share of the images; metrics, examples and the log are
    merged across ranks (every rank returns the same report).

    ``save_masks``: write each scored prediction as an 8-bit PNG named by image stem (original
    in the folder itself, the other variants in a subfolder named after them).
    """
    config = config or TokenCutConfig()
    block = backbone.num_blocks - 1
    log = RunLog()
    for path in dataset.missing:
        log.skip(str(path), "no mask with this stem")
    if head is not None and config.features == "keys" and head.apply_block == block:
        log.warn("a SOAP head at the last block changes output tokens, not attention keys: "
                 "keys are evaluated original only")
        head = None
    metrics: dict[str, SalientMetrics] = {}
    keeper = _ExampleKeeper(n_examples)
    params = BilateralParams()
    seconds = {"read_and_encode": 0.0, "tokencut": 0.0, "bilateral": 0.0}
    start = time.perf_counter()
    batches = iter_tokens(backbone, dataset, config.image_transform(backbone), blocks=block, head=head,
                          keys=config.features == "keys", batch_size=config.batch_size, num_workers=num_workers,
                          keep_images=True, positional_baseline=config.features == "tokens", across_ranks=True,
                          log=log, progress=progress, stage="tokencut")
    t0 = time.perf_counter()
    for batch in batches:
        t1 = time.perf_counter()
        seconds["read_and_encode"] += t1 - t0
        patch_masks = {}
        for v, feats in batch.variants().items():
            grid = feats.keys if config.features == "keys" else feats.tokens[block]
            patch_masks[v] = tokencut_masks(grid, config.tau, config.eps, method=config.solver).masks.cpu()
        seconds["tokencut"] += time.perf_counter() - t1
        for i, (index, image, mask) in enumerate(zip(batch.indices, batch.images, batch.targets)):
            stem = dataset.samples[index].stem
            preds = {}
            for v in patch_masks:
                full = upsample_nearest(patch_masks[v][i : i + 1], mask.shape)[0].numpy()
                if config.bilateral:
                    metrics.setdefault(f"{v}/raw", SalientMetrics()).add(full, mask)
                    t2 = time.perf_counter()
                    preds[v] = to_uint8(bilateral_solve(np.asarray(image), full.astype(np.float64), params))
                    seconds["bilateral"] += time.perf_counter() - t2
                else:
                    preds[v] = to_uint8(full)
                metrics.setdefault(v, SalientMetrics()).add(preds[v], mask)
                if save_masks is not None:
                    folder = Path(save_masks) / ("" if v == "original" else v)
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(preds[v]).save(folder / f"{stem}.png")
            if "soap" in preds:
                diff = abs(salient_scores(preds["soap"], mask).iou - salient_scores(preds["original"], mask).iou)
            else:
                diff = -index
            keeper.offer(diff, index, lambda: Example(stem, np.asarray(image), mask, dict(preds)))
        t0 = time.perf_counter()
    seconds["total"] = time.perf_counter() - start
    metrics, log, keeper = across_ranks(metrics), gather_log(log), keeper.across_ranks()
    if "original" not in metrics:
        raise SoapvitError(f"no image could be evaluated; first problems: {'; '.join(log.lines()[:3])}")
    settings = {**config.__dict__, "model": backbone.model_id, "device": str(backbone.device),
                "head": None if head is None else {"backbone": head.metadata.get("backbone"),
                                                    "apply_block": head.apply_block}}
    order_key = lambda name: (name.endswith("/raw"), VARIANT_ORDER.index(name.split("/")[0]))  # noqa: E731
    results = {name: metrics[name].result() for name in sorted(metrics, key=order_key)}
    return TokenCutReport(results=results, settings=settings, log=log,
                          seconds=seconds, examples=keeper.examples())
