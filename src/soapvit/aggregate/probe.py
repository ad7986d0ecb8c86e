"""The probe pipeline: encode train/val once (cached), then CLS / mean / AbMILP probes (linear
heads trained on the cache, or kNN), on the original tokens and, with a SOAP head, on the
SOAP-corrected patch tokens.

A head applied at the probed (last) block is a linear map of the cached patch tokens, so the
corrected tokens are computed from the cache without a second forward pass; a head applied at an
earlier block changes everything after it, so the attached backbone is encoded (and cached under
a key that includes the head's digest).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..errors import SoapvitError
from .cache import TokenCache, encode_images, weights_digest
from .datasets import LabelledImages
from .heads import POOLS, ProbeClassifier, make_pool
from .train import ProbeConfig, knn_scores, topk_accuracy, train_probe

METHODS = ("linear", "knn")


@dataclass
class AbMILPOptions:
    """AbMILP head settings (published default: one linear score layer, no self-attention, no
    positional conditioning)."""

    depth: int = 1
    activation: str = "relu"
    self_attention: str = "none"
    conditioning: str = "none"


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
class ProbeRun:
    """Every probe of one backbone, with what the encoding cost."""

    model_id: str
    image_size: int
    num_patches: int
    n_train: int
    n_val: int
    views: int
    encode_seconds: float
    cache_parts_reused: int
    cache_parts: int
    seconds: float
    results: list[ProbeResult] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def soap_corrected(cache: TokenCache, head, chunk: int = 2048) -> TokenCache:
    """The cache with ``head.transform`` applied to every patch token (float32 math, float16 out)."""
    patches = torch.empty_like(cache.patches)
    for start in range(0, patches.shape[0], chunk):
        patches[start : start + chunk] = head.transform(cache.patches[start : start + chunk].float()).half()
    return cache.with_patches(patches)


def pooled_features(pool_name: str, cache: TokenCache) -> Tensor:
    """CLS or mean-pooled vectors of the plain view ``(N, D)``, float32."""
    plain = cache.plain()
    pool = make_pool(pool_name, plain.patches.shape[-1])
    return pool(plain.prefix.float(), plain.patches.float())[0]


def run_probe(backbone: Backbone, train: LabelledImages, val: LabelledImages, *,
              pools: Sequence[str] = POOLS, method: str = "linear", soap_head=None, image_size: int | None = None,
              views: int = 1, config: ProbeConfig | None = None, abmilp: AbMILPOptions | None = None,
              knn_k: int = 20, knn_temperature: float = 0.07, cache_dir=None, batch_size: int = 64,
              progress: Callable[[str, int, int], None] | None = None) -> ProbeRun:
    """Probe ``backbone`` (frozen) on ``train``→``val`` for every pool in ``pools``."""
    start_time = time.perf_counter()
    config = config or ProbeConfig()
    abmilp = abmilp or AbMILPOptions()
    if method not in METHODS:
        raise SoapvitError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    for pool in pools:
        if pool not in POOLS:
            raise SoapvitError(f"--pool must be among {', '.join(POOLS)}, not {pool!r}")
        if method == "knn" and pool == "abmilp":
            raise SoapvitError("--method knn works with --pool cls or mean (AbMILP weights must be trained)")
    if (train.labels < 0).any() or (val.labels < 0).any():
        raise SoapvitError("probes need labelled data: shards with .cls files or one sub-folder per class")
    if soap_head is not None and soap_head.projector.shape[0] != backbone.embed_dim:
        raise SoapvitError(f"--head dimension {soap_head.projector.shape[0]} does not match "
                           f"{backbone.model_id} ({backbone.embed_dim})")
    size = image_size or backbone.image_size
    if size % backbone.patch_size:
        raise SoapvitError(f"--image-size {size} is not a multiple of the patch size {backbone.patch_size}")
    block = backbone.num_blocks - 1
    common = dict(image_size=size, block=block, batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    caches = {"original": (encode_images(backbone, train, views=views, seed=config.seed, label="encoding train",
                                         **common),
                           encode_images(backbone, val, label="encoding val", **common))}
    if soap_head is not None:
        if soap_head.apply_layer == block:
            caches["soap"] = tuple(soap_corrected(c, soap_head) for c in caches["original"])
        else:
            from ..soap import attach

            corrected = attach(backbone, soap_head)
            digest = weights_digest(soap_head)
            caches["soap"] = (encode_images(corrected, train, views=views, seed=config.seed, head_digest=digest,
                                            label="encoding train (SOAP)", **common),
                              encode_images(corrected, val, head_digest=digest, label="encoding val (SOAP)", **common))
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    dim = backbone.embed_dim
    results = []
    for tokens, (train_cache, val_cache) in caches.items():
        for pool in pools:
            t0 = time.perf_counter()
            if method == "knn":
                scores = knn_scores(pooled_features(pool, train_cache), train_cache.labels,
                                    pooled_features(pool, val_cache), k=knn_k, temperature=knn_temperature,
                                    num_classes=num_classes)
                top1, top5 = topk_accuracy(scores, val_cache.labels)
                results.append(ProbeResult(pool, tokens, method, top1, top5, seconds=time.perf_counter() - t0))
                continue
            torch.manual_seed(config.seed)
            classifier = ProbeClassifier(make_pool(pool, dim, grid=train_cache.grid, **asdict(abmilp)), dim,
                                         num_classes)
            score = train_probe(classifier, train_cache, val_cache, config, progress=progress)
            results.append(ProbeResult(pool, tokens, method, score.top1, score.top5, score.weight_entropy,
                                       score.weight_count90, score.seconds))
    all_caches = [c for pair in caches.values() for c in pair]
    train_cache = caches["original"][0]
    return ProbeRun(
        model_id=backbone.model_id, image_size=size, num_patches=train_cache.patches.shape[1], n_train=len(train),
        n_val=len(val), views=views, encode_seconds=sum(c.meta["encode_seconds"] for c in all_caches),
        cache_parts_reused=sum(c.meta["parts_from_cache"] for c in all_caches),
        cache_parts=sum(c.meta["parts"] for c in all_caches), seconds=time.perf_counter() - start_time,
        results=results,
        config={"probe": asdict(config), "abmilp": asdict(abmilp), "method": method, "knn_k": knn_k,
                "train": train.identity | {"files": len(train.identity.get("files", []))},
                "val": val.identity | {"files": len(val.identity.get("files", []))}},
    )
