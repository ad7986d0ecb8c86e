"""TokenCut over a salient-object dataset, original and SOAP-corrected features from one pass.

Images are grouped by input size so that every batch is one backbone forward and one batched
TokenCut solve. Per image the patch mask is upsampled (nearest) to the original size, optionally
refined by the bilateral solver (its soft output is what TokenCut scores), and scored against
the mask. An unreadable image or mask is skipped with its reason; nothing else stops the run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..backbones.base import Backbone
from ..data.images import ImageReadError, ImageTransform, load_image
from ..data.saliency import SaliencyDataset, SalientSample, load_mask
from ..errors import SoapvitError
from ..features import encode
from .bilateral import BilateralParams, bilateral_solve
from .metrics import SalientMetrics, salient_scores, to_uint8
from .tokencut import tokencut_masks, upsample_nearest

FEATURES = ("tokens", "keys")
DEFAULT_TAU = {"tokens": 0.3, "keys": 0.2}  # SOAP's evaluation / TokenCut
Progress = Callable[[str, int, int], None]


@dataclass
class TokenCutSettings:
    """Defaults reproduce METHODS.md §6: output tokens, τ = 0.3, Lanczos resize of each side to
    its nearest patch multiple, no solver."""

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
        if self.features not in FEATURES:
            raise SoapvitError(f"--features must be one of {', '.join(FEATURES)}, not {self.features!r}")
        if self.tau is None:
            self.tau = DEFAULT_TAU[self.features]
        if self.resize == "square" and not self.image_size:
            raise SoapvitError("--resize square needs --image-size")

    def transform(self, backbone: Backbone) -> ImageTransform:
        return ImageTransform.for_backbone(backbone, size=self.image_size, mode=self.resize, resample=self.resample)


@dataclass
class Example:
    """One image kept for the comparison figure."""

    stem: str
    image: np.ndarray
    ground_truth: np.ndarray
    predictions: dict[str, np.ndarray]


@dataclass
class TokenCutReport:
    """Metrics per variant (``original``, ``soap``; ``…/raw`` = before the solver when it is on)."""

    results: dict[str, dict]
    settings: dict
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        n = max((r["n_images"] for r in self.results.values()), default=0)
        return n / max(self.seconds.get("total", 0.0), 1e-9)


def _group_by_input_size(samples: list[SalientSample], transform: ImageTransform, skipped: list[str]):
    """Samples grouped by the model-input size of their image (read from the file header)."""
    groups: dict[tuple[int, int], list[SalientSample]] = {}
    for sample in samples:
        try:
            with Image.open(sample.image) as img:
                size = img.size
        except (OSError, ValueError, SyntaxError) as err:
            skipped.append(f"{sample.image}: cannot read image ({err})")
            continue
        groups.setdefault(transform.output_size(*size), []).append(sample)
    return groups


def _variant_features(feats, settings: TokenCutSettings, head, block: int) -> dict[str, torch.Tensor]:
    if settings.features == "keys":
        return {"original": feats.keys}
    out = {"original": feats.tokens[block]}
    if head is not None:
        out["soap"] = head.transform(feats.tokens[block])
    return out


class _ExampleKeeper:
    """Keeps the ``n`` images where original and SOAP masks differ most in IoU (the first ``n``
    images without a head)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[tuple[float, int, Example]] = []

    def offer(self, score: float, order: int, example_factory) -> None:
        if len(self.items) < self.n or score > self.items[-1][0]:
            self.items.append((score, order, example_factory()))
            self.items.sort(key=lambda t: (-t[0], t[1]))
            del self.items[self.n :]

    def examples(self) -> list[Example]:
        return [e for _, _, e in sorted(self.items, key=lambda t: t[1])]


def evaluate_tokencut(
    backbone: Backbone,
    dataset: SaliencyDataset,
    *,
    head=None,
    settings: TokenCutSettings | None = None,
    save_masks: str | Path | None = None,
    n_examples: int = 4,
    progress: Progress | None = None,
) -> TokenCutReport:
    """Run TokenCut on every sample; with a head, also on SOAP-corrected tokens of the same pass.

    ``save_masks``: write each scored prediction as an 8-bit PNG named by image stem (original
    in the folder itself, SOAP in its ``soap/`` subfolder).
    """
    settings = settings or TokenCutSettings()
    block = backbone.num_blocks - 1
    notes: list[str] = []
    if head is not None and head.apply_layer != block:
        raise SoapvitError(f"--head applies to block {head.apply_layer}, but TokenCut uses the last block ({block})")
    if head is not None and settings.features == "keys":
        notes.append("SOAP is defined on output tokens, not on attention keys: keys are evaluated original only")
        head = None
    device = backbone.device
    transform = settings.transform(backbone)
    variants = ["original"] + (["soap"] if head is not None else [])
    scored = [f"{v}/raw" for v in variants] + variants if settings.bilateral else variants
    metrics = {name: SalientMetrics() for name in scored}
    out_dirs = {}
    if save_masks is not None:
        out_dirs = {"original": Path(save_masks), "soap": Path(save_masks) / "soap"}
        for v in variants:
            out_dirs[v].mkdir(parents=True, exist_ok=True)
    skipped = [f"{p}: no mask with this stem" for p in dataset.missing]
    groups = _group_by_input_size(dataset.samples, transform, skipped)
    keeper = _ExampleKeeper(n_examples)
    params = BilateralParams()
    seconds = {"forward": 0.0, "tokencut": 0.0, "bilateral": 0.0}
    start = time.perf_counter()
    total, done, order = len(dataset.samples), len(dataset.samples) - sum(map(len, groups.values())), 0
    for samples in groups.values():
        for first in range(0, len(samples), settings.batch_size):
            batch, images, masks, pixels = [], [], [], []
            for sample in samples[first : first + settings.batch_size]:
                try:
                    image = load_image(sample.image)
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        mask = load_mask(sample.mask, size=image.size)
                    notes.extend(str(w.message) for w in caught)
                except ImageReadError as err:
                    skipped.append(str(err))
                    continue
                batch.append(sample)
                images.append(image)
                masks.append(mask)
                pixels.append(transform(image))
            done += len(samples[first : first + settings.batch_size]) - len(batch)
            if not batch:
                continue
            t0 = time.perf_counter()
            feats = encode(backbone, torch.stack(pixels).to(device), block, keys=settings.features == "keys")
            t1 = time.perf_counter()
            patch_masks = {v: tokencut_masks(f, settings.tau, settings.eps, method=settings.solver).masks.cpu()
                           for v, f in _variant_features(feats, settings, head, block).items()}
            seconds["forward"] += t1 - t0
            seconds["tokencut"] += time.perf_counter() - t1
            for i, (sample, image, mask) in enumerate(zip(batch, images, masks)):
                preds = {}
                for v in variants:
                    full = upsample_nearest(patch_masks[v][i : i + 1], mask.shape)[0].numpy()
                    if settings.bilateral:
                        metrics[f"{v}/raw"].add(full, mask)
                        t2 = time.perf_counter()
                        preds[v] = to_uint8(bilateral_solve(np.asarray(image), full.astype(np.float64), params))
                        seconds["bilateral"] += time.perf_counter() - t2
                    else:
                        preds[v] = to_uint8(full)
                    metrics[v].add(preds[v], mask)
                    if v in out_dirs:
                        Image.fromarray(preds[v]).save(out_dirs[v] / f"{sample.stem}.png")
                if "soap" in preds:
                    diff = abs(salient_scores(preds["soap"], mask).iou - salient_scores(preds["original"], mask).iou)
                else:
                    diff = -order
                keeper.offer(diff, order, lambda: Example(sample.stem, np.asarray(image), mask, dict(preds)))
                order += 1
            done += len(batch)
            if progress:
                progress("tokencut", done, total)
    seconds["total"] = time.perf_counter() - start
    n_scored = metrics["original"].n_images
    if n_scored == 0:
        raise SoapvitError(f"no image could be evaluated; first problems: {'; '.join(skipped[:3])}")
    settings_dict = {**settings.__dict__, "model": backbone.model_id, "device": str(device),
                     "head": None if head is None else head.metadata.get("path", "given")}
    return TokenCutReport(
        results={name: m.result() for name, m in metrics.items()}, settings=settings_dict, skipped=skipped,
        warnings=notes, examples=keeper.examples(), seconds=seconds,
    )
