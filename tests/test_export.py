"""``soapvit export``: the ONNX graph with the correction folded in gives the torch forward with the
correction (onnxruntime), with a dynamic batch, and records the head's metadata."""

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_extract import ASSETS, fit_head

from soapvit.backbones import load
from soapvit.corrections import CorrectionSet, attach
from soapvit.export import export_onnx, onnx_session, read_metadata

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def mae():
    return load("zoo:mae")


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    return {"last": fit_head(folder / "last.safetensors"),
            "early": fit_head(folder / "early.safetensors", apply_block=2, blocks=[2, 5])}


def pixels(batch, size, seed=7):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run_onnx(path, x):
    return onnx_session(path).run(None, {"pixels": x.numpy()})


def printed_differences(err):
    return [float(v) for v in re.findall(r"max abs difference ([0-9.e+-]+)", err)]


def test_last_block_soap_head_is_one_matmul_after_the_final_norm(tmp_path, run_cli, mae, heads):
    out = tmp_path / "mae-soap.onnx"
    code, _, err = run_cli(["export", "--model", "zoo:mae", "--head", str(heads["last"]), "--out", str(out)])
    assert code in (0, None), err
    diffs = printed_differences(err)
    assert len(diffs) == 1 and diffs[0] < TOLERANCE
    head = CorrectionSet.load(heads["last"])["soap"]
    graph = onnx.load(str(out)).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {o: n for n in graph.node for o in n.output}
    final = producers[graph.output[0].name]
    while final.op_type not in ("MatMul", "Gemm"):  # through shape-only ops
        final = producers[final.input[0]]
    assert final.op_type == "MatMul" and np.allclose(constants[final.input[1]], head.projector.numpy(), atol=0)
    # batch 5 on a graph traced with batch 2; the torch forward with the head, and not without it
    x = pixels(5, mae.image_size)
    tokens, prefix = run_onnx(out, x)
    with torch.no_grad():
        corrected = attach(mae, head).forward_features(x)
        original = mae(x)
    assert tokens.shape == (5, 8, 8, 64) and prefix.shape == (5, 1, 64)
    assert np.abs(tokens - corrected.tokens[5].numpy()).max() < TOLERANCE
    assert np.abs(prefix - corrected.prefix[5].numpy()).max() < TOLERANCE
    assert np.abs(tokens - original.numpy()).max() > 1e-2
    meta = read_metadata(out)
    assert meta["backbone"] == "zoo:mae" and meta["weights_digest"] == mae.weights_digest()
    assert meta["correction"] == {"name": "soap", "method": "soap", "block": 5, "digest": head.digest(),
                                  "folded": "output"}
    assert meta["head_metadata"]["n_real"] == 10 and meta["head_metadata"]["backbone"] == "zoo:mae"
    assert meta["dynamic_image_size"] is False and meta["max_abs_difference"]["64x64"] < TOLERANCE


def test_an_earlier_block_head_is_inside_the_graph(tmp_path, mae, heads):
    corrections = CorrectionSet.load(heads["early"])
    head = corrections["soap"]
    report = export_onnx(mae, tmp_path / "early.onnx", correction=head, correction_name="soap",
                         metadata=corrections.metadata)
    assert report.differences["64x64"] < TOLERANCE
    x = pixels(3, 64)
    tokens, _ = run_onnx(tmp_path / "early.onnx", x)
    with torch.no_grad():
        want = attach(mae, head)(x).numpy()
        # the same projector applied to the output instead would be another model
        outside = head.transform(mae(x)).numpy()
    assert np.abs(tokens - want).max() < TOLERANCE
    assert np.abs(tokens - outside).max() > 1e-2
    assert read_metadata(tmp_path / "early.onnx")["correction"]["folded"] == "inside the forward pass"


def test_a_map_style_correction_is_exported_as_its_transform(tmp_path, mae, heads):
    corrections = CorrectionSet.load(heads["last"])
    report = export_onnx(mae, tmp_path / "posmean.onnx", correction=corrections["posmean"], correction_name="posmean")
    assert report.differences["64x64"] < TOLERANCE
    x = pixels(2, 64)
    tokens, _ = run_onnx(tmp_path / "posmean.onnx", x)
    with torch.no_grad():
        want = attach(mae, corrections["posmean"])(x).numpy()
        original = mae(x).numpy()
    assert np.abs(tokens - want).max() < TOLERANCE and np.abs(tokens - original).max() > 1e-2


def test_without_a_head_and_at_another_fixed_size(tmp_path, mae):
    report = export_onnx(mae, tmp_path / "plain.onnx", image_size=80)
    assert report.differences == {"80x80": pytest.approx(0, abs=TOLERANCE)} and not report.dynamic_size
    tokens, _ = run_onnx(tmp_path / "plain.onnx", pixels(1, 80))
    with torch.no_grad():
        assert np.abs(tokens - mae(pixels(1, 80)).numpy()).max() < TOLERANCE
    assert read_metadata(tmp_path / "plain.onnx")["correction"] is None


@pytest.mark.slow
def test_imgfocus_with_a_head_dynamic_batch_and_image_size(tmp_path, run_cli):
    from soapvit.fitting import fit

    backbone = load("zoo:dinov2-s14-imgfocus")
    corrections, _ = fit(backbone, ASSETS, limit=8, synthetic=6, blocks="last", batch_size=8, device="cpu")
    corrections.save(tmp_path / "head.safetensors")
    out = tmp_path / "imgfocus.onnx"
    code, _, err = run_cli(["export", "--model", "zoo:dinov2-s14-imgfocus", "--head", str(tmp_path / "head.safetensors"),
                            "--out", str(out)])
    assert code in (0, None), err
    diffs = printed_differences(err)
    assert len(diffs) == 2 and max(diffs) < TOLERANCE  # 224 and 252 px
    x = pixels(3, 196)
    tokens, _ = run_onnx(out, x)
    with torch.no_grad():
        want = attach(backbone, corrections["soap"])(x).numpy()
    assert tokens.shape == (3, 14, 14, 384) and np.abs(tokens - want).max() < TOLERANCE
    assert read_metadata(out)["dynamic_image_size"] is True
