"""Scale-out on torch.distributed (gloo on CPU): several processes give one process's numbers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ColourBackbone
from eval_helpers import make_head, saliency_folder
from PIL import Image
from test_eval_knnseg import seg_folder
from conftest import ToyBackbone

from soapvit import distributed
from soapvit.data.saliency import SaliencyDataset
from soapvit.data.segmentation import SegmentationSplit
from soapvit.data.sources import open_images
from soapvit.eval.correspondence import WarpConfig, evaluate_warp
from soapvit.eval.knnseg import KnnConfig, evaluate_knnseg
from soapvit.eval.linear_seg import LinearSegConfig, evaluate_linear_seg
from soapvit.eval.salient import TokenCutConfig, evaluate_tokencut
from conftest import fit_soap
from soapvit.resume import FitState, align_stages
from soapvit.corrections.soap import SoapHead

ASSETS = os.path.join(os.path.dirname(__file__), "..", "src", "soapvit", "assets", "sample_images")


def assert_same_head(a: SoapHead, b: SoapHead, atol: float = 1e-6) -> None:
    assert sorted(a.blocks) == sorted(b.blocks) and a.apply_block == b.apply_block
    for blk, d in a.blocks.items():
        for name in ("mean", "eigenvalues", "si", "weights", "p_real", "q_synthetic", "position_share"):
            torch.testing.assert_close(getattr(d, name), getattr(b.blocks[blk], name), atol=atol, rtol=0)
        # eigenvectors up to sign
        signs = torch.sign((d.eigenvectors * b.blocks[blk].eigenvectors).sum(0))
        torch.testing.assert_close(d.eigenvectors, b.blocks[blk].eigenvectors * signs, atol=atol, rtol=0)
    torch.testing.assert_close(a.projector, b.projector, atol=atol, rtol=0)
    assert a.metadata["n_real"] == b.metadata["n_real"] and a.metadata["n_synthetic"] == b.metadata["n_synthetic"]


def make_data(root):
    """Seven real images, a saliency set and a segmentation split pair under ``root``."""
    images = root / "real"
    images.mkdir()
    for i in range(7):
        Image.effect_noise((20, 20), 30 + 10 * i).convert("RGB").save(images / f"{i}.png")
    saliency_folder(root / "ecssd")
    seg_folder(root / "seg" / "train", 5, 0)
    seg_folder(root / "seg" / "val", 4, 1)
    return root


def run_jobs(root):
    """Fit (7 real images in batches of 2, 5 synthetic), TokenCut with a head, kNN segmentation."""
    head, _ = fit_soap(ToyBackbone(blocks=2), root / "real", synthetic=5, batch_size=2, device="cpu", blocks="all")
    colour = ColourBackbone()
    tokencut = evaluate_tokencut(colour, SaliencyDataset.from_folders(root / "ecssd" / "images"),
                                 corrections={"soap": make_head(torch.diag(torch.linspace(0, 1, 12)))},
                                 config=TokenCutConfig(batch_size=2, solver="eigh"))
    knn = evaluate_knnseg(colour, SegmentationSplit.open(root / "seg" / "train"),
                          SegmentationSplit.open(root / "seg" / "val", what="--val"),
                          config=KnnConfig(k=5, image_size=32, batch_size=2))
    return head, tokencut, knn


def aligned_resume_state(rank):
    """A resume where rank 1 got past pass 1 (merged moments saved) and ranks 0 and 2 did not."""
    state = FitState.fresh([0], (2, 2), 3, torch.device("cpu"))
    state.moments[0].update(torch.full((4, 3), float(rank)) + torch.arange(4.0)[:, None])
    state.real_steps, state.n_real = 5, 4
    if rank == 1:
        state.stage, state.real_steps = "responses", 2
    aligned = align_stages(state)
    return {"stage": aligned.stage, "steps": aligned.real_steps, "n_real": aligned.n_real,
            "mean": aligned.moments[0].mean}


def _worker(rank, world, root):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-{world}", rank=rank, world_size=world)
    try:
        head, tokencut, knn = run_jobs(root)
        aligned = aligned_resume_state(rank)
        if rank == 2:
            torch.save(aligned, root / "aligned.pt")
        if rank == 0:
            head.save(root / f"head-{world}.safetensors")
            (root / f"eval-{world}.json").write_text(json.dumps(
                {"tokencut": tokencut.results, "knn": knn.results, "skipped": tokencut.skipped,
                 "intervals": tokencut.intervals, "per_image": tokencut.per_image,
                 "examples": [e.stem for e in tokencut.examples], "bank": knn.bank_size}))
    finally:
        dist.destroy_process_group()


def test_three_gloo_processes_fit_tokencut_knn_and_resume_alignment_like_one(tmp_path):
    root = make_data(tmp_path)
    head, tokencut, knn = run_jobs(root)
    mp.spawn(_worker, args=(3, root), nprocs=3)
    assert_same_head(head, SoapHead.load(root / "head-3.safetensors"))
    got = json.loads((root / "eval-3.json").read_text())
    assert got["tokencut"].keys() == tokencut.results.keys() and tokencut.results["original"]["n_images"] == 7
    for variant, result in tokencut.results.items():
        assert got["tokencut"][variant] == pytest.approx(result, abs=1e-6)
    assert sorted(map(str, got["skipped"])) == sorted(map(str, tokencut.skipped))
    assert got["examples"] == [e.stem for e in tokencut.examples]
    assert got["bank"] == knn.bank_size
    assert got["per_image"] == tokencut.per_image and got["intervals"] == tokencut.intervals
    aligned = torch.load(root / "aligned.pt")
    assert aligned["stage"] == "responses" and aligned["steps"] == 0 and aligned["n_real"] == 4
    torch.testing.assert_close(aligned["mean"], torch.full((3,), 2.5, dtype=torch.float64))  # rank 1's moments
    for variant, result in knn.results.items():
        assert got["knn"][variant]["miou"] == pytest.approx(result["miou"], abs=1e-6)
        assert got["knn"][variant]["per_class_iou"] == pytest.approx(result["per_class_iou"], abs=1e-6)


def run_protocols(root):
    """The CAPI kNN protocol, the linear probe and warp consistency, each with a correction."""
    colour = ColourBackbone()
    corrections = {"soap": make_head(torch.diag(torch.linspace(0, 1, 12)))}
    train, val = SegmentationSplit.open(root / "seg" / "train"), SegmentationSplit.open(root / "seg" / "val", what="--val")
    capi = evaluate_knnseg(colour, train, val, corrections=corrections,
                           config=KnnConfig(protocol="capi", image_size=32, batch_size=2))
    linseg = evaluate_linear_seg(colour, train, val, corrections=corrections,
                                 config=LinearSegConfig(iterations=40, batch_size=2, image_size=32, encode_batch_size=2))
    warp = evaluate_warp(colour, open_images(root / "real"), corrections=corrections,
                         config=WarpConfig(image_size=32, batch_size=2))
    return {name: {"results": r.results, "intervals": r.intervals, "per_image": r.per_image}
            for name, r in (("capi", capi), ("linseg", linseg), ("warp", warp))}


def _protocol_worker(rank, world, root):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-protocols", rank=rank, world_size=world)
    try:
        got = run_protocols(root)
        if rank == 0:
            (root / "protocols.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_score_capi_knn_linear_probe_and_warp_like_one(tmp_path):
    root = make_data(tmp_path)
    one = json.loads(json.dumps(run_protocols(root)))  # the same JSON round trip as the workers' file
    mp.spawn(_protocol_worker, args=(2, root), nprocs=2)
    two = json.loads((root / "protocols.json").read_text())
    assert one["capi"]["results"]["original"]["miou"] > 50 and one["warp"]["results"]["original"]["n_images"] == 7
    assert one["linseg"]["results"]["soap"]["miou"] > 0
    assert_same_json(two, one)


def assert_same_json(got, expected, where="", atol=1e-6):
    """Equal structure, strings and counts; floats within ``atol``."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_same_json(got[key], expected[key], f"{where}/{key}", atol)
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same_json(g, e, f"{where}/{i}", atol)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=atol, nan_ok=True), where
    else:
        assert got == expected, where


def test_torchrun_two_processes_cli_fit_equals_one(tmp_path, run_cli):
    common = ["fit", "--model", "zoo:mae", "--images", ASSETS, "--limit", "9", "--synthetic", "5",
              "--batch-size", "2", "--blocks", "all", "--device", "cpu"]
    code, _, err = run_cli([*common, "--out", str(tmp_path / "one.safetensors")])
    assert code in (0, None), err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "soapvit",
                           *common, "--out", str(tmp_path / "two.safetensors")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("fitted 6 block(s) on 9 real + 5 synthetic") == 1  # rank 0 alone prints
    assert_same_head(SoapHead.load(tmp_path / "one.safetensors"), SoapHead.load(tmp_path / "two.safetensors"))


def test_single_process_helpers_are_identities():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.share(list(range(7)), 1, 3) == [1, 4] and distributed.share([5, 6]) == [5, 6]
    assert distributed.gather_by_index([(2, "b"), (0, "a")]) == ["a", "b"]
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum(t) is t and distributed.all_gather_tensor(t)[0] is t
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert np.array_equal(distributed.all_gather_objects(np.ones(2))[0], np.ones(2))
