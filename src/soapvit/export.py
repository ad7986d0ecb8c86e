"""The backbone with its correction folded in, as ONNX: corrected tokens in any ONNX runtime.

:class:`CorrectedTokens` is the exported module: normalised pixels ``(B, 3, H, W)`` → ``tokens``
``(B, h, w, D)`` (the last block's final-norm patch tokens, corrected) and ``prefix`` ``(B, P, D)``.
By the head rule (:mod:`soapvit.corrections.base`), a correction at the last block maps the output:
for a SOAP head that is one MatMul with the constant projector after the final norm; a correction
at an earlier block is inserted into the forward pass, inside the graph; other map-style
corrections are traced as their torch ``transform``.

:func:`export_onnx` exports with the TorchScript exporter (``dynamo=False``: no onnxscript
needed), with a dynamic batch axis and, for backbones whose position embedding is interpolated by
traceable code (Hugging Face models that take ``interpolate_pos_encoding``), dynamic height and
width. Native ``zoo:`` ViTs resample their position grid with Python arithmetic on shapes, so they
export at one image size. The file is checked with onnxruntime against the torch forward with the
correction (``attach(backbone, correction)``) and records the correction's metadata in
``metadata_props`` (key ``soapvit``, JSON).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .backbones.base import Backbone
from .errors import SoapvitError

METADATA_KEY = "soapvit"
DYNAMIC_TOLERANCE = 1e-3
"""Largest difference at a second image size for the graph to be kept with a dynamic size."""


class CorrectedTokens(nn.Module):
    """``pixels → (tokens, prefix)`` of the last block with ``correction`` applied (module doc)."""

    def __init__(self, backbone: Backbone, correction=None) -> None:
        super().__init__()
        self.backbone, self.correction = backbone, correction
        self.maps_output = correction is not None and correction.maps_output(backbone)
        if correction is None or self.maps_output:
            self.encoder = backbone
            if correction is not None:
                correction.prepare(backbone)
        else:
            self.encoder = correction.wrap(backbone)

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        last = self.backbone.num_blocks - 1
        feats = self.encoder.forward_features(pixels, last)
        tokens = feats.tokens[last]
        if self.maps_output:
            tokens = self.correction.transform(tokens)
        return tokens, feats.prefix[last]


def reference_tokens(backbone: Backbone, correction, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """The torch forward with the correction, by the library's own head rule (``attach``)."""
    from .corrections import attach

    model = backbone if correction is None else attach(backbone, correction)
    with torch.no_grad():
        feats = model.forward_features(pixels)
    last = backbone.num_blocks - 1
    return feats.tokens[last], feats.prefix[last]


def dynamic_image_size(backbone: Backbone) -> bool:
    """Whether the exported graph can take other image sizes (module doc): Hugging Face models,
    whose position interpolation is written for tracing."""
    from .backbones.hf import HFBackbone

    return isinstance(getattr(backbone, "backbone", backbone), HFBackbone)


@contextlib.contextmanager
def _traceable(backbone: Backbone, grid: tuple[int, int]):
    """The native ViT's position resampling at the export grid, as constants: its Python shape
    arithmetic cannot be traced, and at the training grid it is the identity."""
    from .backbones import vit

    original = vit.resample_position_embedding
    resampled: dict[int, Tensor] = {}

    def resample(pos: Tensor, _grid) -> Tensor:
        if id(pos) not in resampled:  # computed once, before tracing sees it: a constant of the graph
            with torch.no_grad():
                resampled[id(pos)] = original(pos, tuple(grid)).detach().clone()
        return resampled[id(pos)]

    for module in backbone.modules():  # resample outside the trace
        if isinstance(module, vit.VisionTransformer):
            resample(module.pos_embed, grid)
    vit.resample_position_embedding = resample
    try:
        yield
    finally:
        vit.resample_position_embedding = original


@dataclass
class ExportReport:
    path: Path
    dynamic_size: bool
    differences: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    metadata: dict = field(default_factory=dict)


def export_onnx(backbone: Backbone, out: str | Path, *, correction=None, correction_name: str | None = None,
                metadata: dict | None = None, image_size: int | None = None, opset: int = 17,
                head_spec: str | None = None, check_batch: int = 2, seed: int = 0) -> ExportReport:
    """Export ``backbone`` (with ``correction`` folded in) to ``out`` and check it (module doc).
    ``metadata``: the corrections file's metadata, recorded in the ONNX file."""
    import onnx

    start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    backbone = backbone.cpu().eval()
    size = image_size or backbone.image_size
    if size % backbone.patch_size:
        raise SoapvitError(f"--image-size {size} is not a multiple of the patch size {backbone.patch_size}")
    module = CorrectedTokens(backbone, correction).eval()
    dynamic = dynamic_image_size(backbone)
    example = _pixels(check_batch, size, seed)
    axes = {"pixels": {0: "batch"}, "tokens": {0: "batch"}, "prefix": {0: "batch"}}
    if dynamic:
        axes["pixels"].update({2: "height", 3: "width"})
        axes["tokens"].update({1: "grid_height", 2: "grid_width"})
    grid = (size // backbone.patch_size,) * 2

    def run_export(axes) -> None:
        with warnings.catch_warnings(), torch.no_grad(), _traceable(backbone, grid):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(out), dynamo=False, input_names=["pixels"],
                              output_names=["tokens", "prefix"], dynamic_axes=axes, opset_version=opset)

    report = ExportReport(out, dynamic)
    run_export(axes)
    report.differences[f"{size}x{size}"] = check_onnx(out, backbone, correction, _pixels(check_batch + 1, size, seed))
    if dynamic:  # checked at another size too; a graph that does not generalise is exported at one size
        other = size + 2 * backbone.patch_size
        try:
            diff = check_onnx(out, backbone, correction, _pixels(check_batch + 1, other, seed + 1))
        except Exception:  # noqa: BLE001  (onnxruntime refuses the shape)
            diff = float("inf")
        if diff <= DYNAMIC_TOLERANCE:
            report.differences[f"{other}x{other}"] = diff
        else:
            report.dynamic_size = dynamic = False
            for name in ("pixels", "tokens"):
                axes[name] = {0: "batch"}
            run_export(axes)
            report.differences[f"{size}x{size}"] = check_onnx(out, backbone, correction,
                                                             _pixels(check_batch + 1, size, seed))
    info = {
        "backbone": backbone.model_id, "weights_digest": backbone.weights_digest(), "image_size": size,
        "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim,
        "num_prefix_tokens": backbone.num_prefix_tokens, "image_mean": list(backbone.image_mean),
        "image_std": list(backbone.image_std), "dynamic_image_size": dynamic, "head": head_spec,
        "correction": None if correction is None else {
            "name": correction_name, "method": correction.method, "block": correction.block_,
            "digest": correction.digest(), "folded": "output" if module.maps_output else "inside the forward pass"},
        "head_metadata": metadata or {},
        "outputs": {"tokens": "(batch, h, w, D) last-block final-norm patch tokens, corrected",
                    "prefix": "(batch, P, D) prefix tokens (CLS first)"},
        "max_abs_difference": report.differences,
    }
    model = onnx.load(str(out))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info, default=str)
    onnx.save(model, str(out))
    report.metadata = info
    report.seconds = time.perf_counter() - start
    return report


def _pixels(batch: int, size: int, seed: int) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def check_onnx(path: str | Path, backbone: Backbone, correction, pixels: Tensor) -> float:
    """Max abs difference of the ONNX model's tokens and prefix to the torch forward with the correction."""
    session = onnx_session(path)
    tokens, prefix = session.run(None, {"pixels": pixels.numpy()})
    want_tokens, want_prefix = reference_tokens(backbone, correction, pixels)
    if tuple(tokens.shape) != tuple(want_tokens.shape):
        raise SoapvitError(f"the ONNX model gives tokens of shape {tokens.shape}, torch {tuple(want_tokens.shape)}")
    return max(float((torch.from_numpy(tokens) - want_tokens).abs().max()),
               float((torch.from_numpy(prefix) - want_prefix).abs().max()))


def onnx_session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_metadata(path: str | Path) -> dict:
    """The ``soapvit`` metadata of an exported file."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if METADATA_KEY not in props:
        raise SoapvitError(f"{path} was not exported by soapvit (no {METADATA_KEY!r} metadata)")
    return json.loads(props[METADATA_KEY])
