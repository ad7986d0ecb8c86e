"""The probe pipeline: encode train/val once (cached), then CLS / mean / AbMILP probes (linear
heads trained on the cache, or kNN), on the original tokens and, with a SOAP head, on the
SOAP-corrected patch tokens.

Images reach the backbone through the token pipeline (:mod:`soapvit.features`) inside
:func:`~.cache.encode_images`, which also applies the SOAP head by the pipeline's rule.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..data.labelled import LabelledImages
from ..errors import SoapvitError
from ..runlog import Progress, RunReport
from ..validation import COUNT, OPTIONAL_COUNT, POSITIVE, Options, check_each, validate
from .cache import TokenCache, encode_images
from .heads import ABMILP_CONSTRAINTS, POOLS, ProbeClassifier, make_pool
from .train import ProbeConfig, knn_scores, topk_accuracy, train_probe

METHODS = ("linear", "knn")
PROBE_CONSTRAINTS = {"method": Options(METHODS), "views": COUNT, "knn_k": COUNT, "knn_temperature": POSITIVE,
                     "batch_size": COUNT, "image_size": OPTIONAL_COUNT}


@dataclass
class AbMILPConfig:
    """AbMILP head settings (published default: one linear score layer, no self-attention, no
    positional conditioning)."""

    depth: int = 1
    activation: str = "relu"
    self_attention: str = "none"
    conditioning: str = "none"

    def __post_init__(self) -> None:
        validate({f"abmilp_{k}": v for k, v in self.__dict__.items()}, ABMILP_CONSTRAINTS)


@dataclass
class ProbeResult:
    """One probe's score; accuracies are fractions."""

    pool: str
    tokens: str  # "original" or "soap"
    method: str
    top1: float
    top5: float
    weight_entropy: float | None = None
    weight_count90: float | None = None
    seconds: float = 0.0


@dataclass
class ProbeReport(RunReport):
    """Every probe of one backbone: ``results[tokens][pool]`` holds a :class:`ProbeResult` as a dict."""

    model_id: str = ""
    image_size: int = 0
    num_patches: int = 0

    kind = "probe"

    def rows(self) -> list[ProbeResult]:
        return [ProbeResult(**r) for pools in self.results.values() for r in pools.values()]


def pooled_features(pool_name: str, cache: TokenCache) -> Tensor:
    """CLS or mean-pooled vectors of the plain view ``(N, D)``, float32."""
    plain = cache.plain()
    pool = make_pool(pool_name, plain.patches.shape[-1])
    return pool(plain.prefix.float(), plain.patches.float())[0]


def run_probe(backbone: Backbone, train: LabelledImages, val: LabelledImages, *,
              pools: Sequence[str] = POOLS, method: str = "linear", corrections: Mapping | None = None,
              image_size: int | None = None, views: int = 1, config: ProbeConfig | None = None,
              abmilp: AbMILPConfig | None = None, knn_k: int = 20, knn_temperature: float = 0.07, cache_dir=None,
              batch_size: int = 64, num_workers: int | None = None, progress: Progress | None = None) -> ProbeReport:
    """Probe ``backbone`` (frozen, last block) on ``train``→``val`` for every pool in ``pools``, on the
    original tokens and on each of ``corrections`` (checked against the backbone by the caller; see
    :func:`~.cache.encode_images` for which come from the original pass)."""
    start_time = time.perf_counter()
    config = config or ProbeConfig()
    abmilp = abmilp or AbMILPConfig()
    validate({"method": method, "views": views, "knn_k": knn_k, "knn_temperature": knn_temperature,
              "batch_size": batch_size, "image_size": image_size}, PROBE_CONSTRAINTS)
    check_each("pool", pools, Options(POOLS))
    if method == "knn" and "abmilp" in pools:
        raise SoapvitError("--method knn works with --pool cls or mean (AbMILP weights must be trained)")
    if (train.labels < 0).any() or (val.labels < 0).any():
        raise SoapvitError("probes need labelled data: shards with .cls files or one sub-folder per class")
    size = image_size or backbone.image_size
    if size % backbone.patch_size:
        raise SoapvitError(f"--image-size {size} is not a multiple of the patch size {backbone.patch_size}")
    common = dict(image_size=size, corrections=corrections, batch_size=batch_size, cache_dir=cache_dir, num_workers=num_workers,
                  progress=progress)
    train_caches = encode_images(backbone, train, views=views, seed=config.seed, stage="encoding train", **common)
    val_caches = encode_images(backbone, val, stage="encoding val", **common)
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    dim = backbone.embed_dim
    results: dict[str, dict[str, dict]] = {}
    for tokens, train_cache in train_caches.items():
        val_cache = val_caches[tokens]
        for pool in pools:
            t0 = time.perf_counter()
            if method == "knn":
                scores = knn_scores(pooled_features(pool, train_cache), train_cache.labels,
                                    pooled_features(pool, val_cache), k=knn_k, temperature=knn_temperature,
                                    num_classes=num_classes)
                top1, top5 = topk_accuracy(scores, val_cache.labels)
                result = ProbeResult(pool, tokens, method, top1, top5, seconds=time.perf_counter() - t0)
            else:
                torch.manual_seed(config.seed)
                classifier = ProbeClassifier(make_pool(pool, dim, grid=train_cache.grid, **asdict(abmilp)), dim,
                                             num_classes)
                score = train_probe(classifier, train_cache, val_cache, config, progress=progress,
                                    device=backbone.device)
                result = ProbeResult(pool, tokens, method, score.top1, score.top5, score.weight_entropy,
                                     score.weight_count90, score.seconds)
            results.setdefault(tokens, {})[pool] = asdict(result)
    metas = [c.meta for c in (*train_caches.values(), *val_caches.values())]
    train_cache = train_caches["original"]
    settings = {"probe": asdict(config), "abmilp": asdict(abmilp), "method": method, "knn_k": knn_k,
                "knn_temperature": knn_temperature, "views": views, "n_train": len(train), "n_val": len(val),
                "variants": {name: {"method": c.method, "params": c.get_params(), "block": c.block_}
                             for name, c in (corrections or {}).items()},
                "train": train.identity | {"files": len(train.identity.get("files", []))},
                "val": val.identity | {"files": len(val.identity.get("files", []))},
                "cache_parts": sum(m["parts"] for m in {m["folder"] or id(m): m for m in metas}.values()),
                "cache_parts_reused": sum(m["parts_from_cache"] for m in {m["folder"] or id(m): m for m in metas}.values())}
    encode_seconds = sum(m["encode_seconds"] for m in {m["folder"] or id(m): m for m in metas}.values())
    return ProbeReport(results=results, settings=settings,
                       seconds={"encode": encode_seconds, "total": time.perf_counter() - start_time},
                       model_id=backbone.model_id, image_size=size, num_patches=train_cache.patches.shape[1])
