"""``soapvit extract``: tokens on disk equal the pipeline's, shards bounded, a kill then rerun gives
the same files, each rank of torchrun writes its own shards."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from soapvit import extract as extract_module
from soapvit.backbones import load
from soapvit.corrections import CorrectionSet
from soapvit.data.sources import open_images
from soapvit.data.transforms import ImageTransform
from soapvit.errors import SoapvitError
from soapvit.features import iter_tokens

ASSETS = os.path.join(os.path.dirname(__file__), "..", "src", "soapvit", "assets", "sample_images")
# the CLI with every forward pass slowed down, so that a kill lands mid-run
SLOW_CLI = """
import sys, time
import soapvit.features as features
fast = features.encode
def encode(*args, **kwargs):
    time.sleep(0.6)
    return fast(*args, **kwargs)
features.encode = encode
from soapvit.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def mae():
    return load("zoo:mae")


def fit_head(path, apply_block=-1, blocks="last"):
    from soapvit.fitting import fit

    corrections, _ = fit(load("zoo:mae"), ASSETS, limit=10, synthetic=6, blocks=blocks, apply_block=apply_block,
                         batch_size=5, device="cpu", methods=["soap", "posmean"])
    corrections.save(path)
    return path


@pytest.fixture(scope="module")
def last_head(tmp_path_factory):
    return fit_head(tmp_path_factory.mktemp("heads") / "last.safetensors")


@pytest.fixture(scope="module")
def early_head(tmp_path_factory):
    """SOAP at block 2 of 6: inserted into the forward pass, every later block sees it."""
    return fit_head(tmp_path_factory.mktemp("heads") / "early.safetensors", apply_block=2, blocks=[2, 5])


def pipeline_tokens(backbone, corrections, blocks, limit, batch_size):
    """name → variant → block → (tokens, prefix) from ``iter_tokens``."""
    source = open_images(ASSETS, limit)
    out = {}
    for batch in iter_tokens(backbone, source, ImageTransform.for_backbone(backbone), blocks=blocks,
                             corrections=corrections, batch_size=batch_size):
        for j, index in enumerate(batch.indices):
            out[source.name(index)] = {v: {b: (f.tokens[b][j], f.prefix[b][j]) for b in f.tokens}
                                       for v, f in batch.variants.items()}
    return out


def test_written_tokens_equal_the_pipeline_for_every_variant_fp32(tmp_path, run_cli, mae, last_head):
    out = tmp_path / "features"
    code, _, err = run_cli(["extract", "--model", "zoo:mae", "--head", str(last_head), "--images", ASSETS,
                            "--limit", "9", "--out", str(out), "--dtype", "fp32", "--batch-size", "4",
                            "--prefix", "--device", "cpu"])
    assert code in (0, None), err
    features = extract_module.open(out)
    assert features.variants == ["original", "soap", "posmean"] and features.blocks == [5]
    expected = pipeline_tokens(mae, CorrectionSet.load(last_head), "last", 9, 4)
    assert len(features) == 9 and set(features) == set(expected)
    for name, variants in expected.items():
        record = features[name]
        assert record.grid == (8, 8)
        for variant, by_block in variants.items():
            tokens, prefix = by_block[5]
            assert record.tokens[variant][5].dtype == torch.float32
            assert torch.equal(record.tokens[variant][5], tokens), (name, variant)
            assert torch.equal(record.prefix[variant][5], prefix), (name, variant)
        # the corrections really change the tokens (a variant written as the original would pass above only
        # if the pipeline's variants were equal too)
        assert not torch.allclose(record.tokens["soap"][5], record.tokens["original"][5])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backbone"] == "zoo:mae" and manifest["weights_digest"] == mae.weights_digest()
    assert manifest["head"]["sha256"] == extract_module.file_digest(last_head)
    assert manifest["corrections"]["soap"]["block"] == 5 and manifest["dtype"] == "fp32"


def test_an_earlier_block_head_fp16_several_blocks(tmp_path, run_cli, mae, early_head):
    out = tmp_path / "features"
    code, _, err = run_cli(["extract", "--model", "zoo:mae", "--head", str(early_head), "--variants", "soap",
                            "--images", ASSETS, "--limit", "6", "--out", str(out), "--blocks", "2,5",
                            "--batch-size", "3", "--device", "cpu"])
    assert code in (0, None), err
    features = extract_module.open(out)
    expected = pipeline_tokens(mae, CorrectionSet.load(early_head).select(["soap"]), [2, 5], 6, 3)
    for record in features.stream():
        for variant in ("original", "soap"):
            for block in (2, 5):
                got = record.tokens[variant][block]
                assert got.dtype == torch.float16 and got.shape == (8, 8, 64)
                assert torch.equal(got, expected[record.name][variant][block][0].half()), (record.name, variant, block)
        assert record.prefix == {}
        # inserted at block 2: block 5 of the corrected pass differs from the original's
        assert (record.tokens["soap"][5].float() - record.tokens["original"][5].float()).abs().max() > 1e-2


def test_shards_are_bounded_and_the_index_offsets_point_at_the_bytes(tmp_path, mae, last_head):
    corrections = CorrectionSet.load(last_head)
    per_image = 3 * 8 * 8 * 64 * 2  # three variants, fp16
    limit_mb = 2.5 * per_image / 2**20  # two images fit, a third does not
    report = extract_module.extract(mae, open_images(ASSETS, 7), tmp_path, corrections=corrections, dtype="fp16",
                                    shard_mb=limit_mb, batch_size=3)
    assert report.images == 7 and len(report.written) == 4  # 2 + 2 + 2 + 1
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    assert [p.name for p in shards] == [f"shard-r000-of-001-0000{i}.safetensors" for i in range(4)]
    assert all(p.stat().st_size <= limit_mb * 2**20 for p in shards)
    index = json.loads((tmp_path / "index.json").read_text())["images"]
    assert [e["shard"][-17:-12] for e in index] == ["00000", "00000", "00001", "00001", "00002", "00002", "00003"]
    features = extract_module.open(tmp_path)
    for entry in index:
        record = features[entry["name"]]
        raw = (tmp_path / entry["shard"]).read_bytes()
        for rest, tensor in entry["tensors"].items():
            start, end = tensor["offsets"]
            array = np.frombuffer(raw[start:end], dtype=np.float16).reshape(tensor["shape"])
            variant, _, block = rest.split("/")
            assert np.array_equal(array, record.tokens[variant][int(block)].numpy())


def test_another_extraction_in_the_folder_is_refused_and_a_finished_one_is_kept(tmp_path, mae):
    source = open_images(ASSETS, 4)
    first = extract_module.extract(mae, source, tmp_path, batch_size=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = extract_module.extract(mae, source, tmp_path, batch_size=2)
    assert again.images == 0 and again.kept == first.written and again.written == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(SoapvitError, match="holds another extraction \\(its dtype differ\\)"):
        extract_module.extract(mae, source, tmp_path, batch_size=2, dtype="fp32")


def finished_shards(folder):
    return sorted(folder.glob("shard-*.safetensors"))


def test_sigkill_mid_run_then_rerun_gives_identical_files(tmp_path, run_cli, last_head):
    # 3 images per shard, 4 per batch: every shard but the last ends inside a batch, so the rerun must
    # skip the first images of the batch it resumes at
    common = ["extract", "--model", "zoo:mae", "--head", str(last_head), "--images", ASSETS, "--limit", "16",
              "--batch-size", "4", "--shard-mb", str(3 * 8 * 8 * 64 * 2 * 3 / 2**20), "--device", "cpu"]
    code, _, err = run_cli([*common, "--out", str(tmp_path / "uninterrupted")])
    assert code in (0, None), err
    reference = {p.name: p.read_bytes() for p in (tmp_path / "uninterrupted").iterdir()}
    assert len([n for n in reference if n.startswith("shard-")]) == 6  # 3 images per shard: 3·5 + 1

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *common, "--out", str(killed)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(finished_shards(killed)) < 2:
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it was killed: {process.communicate()[1][-2000:]}"
    process.kill()
    process.wait()
    process.stderr.close()
    left = {p.name for p in finished_shards(killed)}
    assert 2 <= len(left) < 6 and not (killed / "index.json").exists()
    for name in left:  # every shard that exists is complete
        assert (killed / name).read_bytes() == reference[name]

    code, _, err = run_cli([*common, "--out", str(killed)])
    assert code in (0, None), err
    assert f"({len(left)} kept from before)" in " ".join(err.split())
    assert {p.name: p.read_bytes() for p in killed.iterdir()} == reference


def test_torchrun_each_rank_writes_its_own_shards(tmp_path, run_cli):
    common = ["extract", "--model", "zoo:mae", "--images", ASSETS, "--limit", "10", "--batch-size", "2",
              "--dtype", "fp32", "--device", "cpu"]
    code, _, err = run_cli([*common, "--out", str(tmp_path / "one")])
    assert code in (0, None), err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "soapvit",
                           *common, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "two").glob("shard-*"))
    assert names == ["shard-r000-of-002-00000.safetensors", "shard-r001-of-002-00000.safetensors"]
    one, two = extract_module.open(tmp_path / "one"), extract_module.open(tmp_path / "two")
    assert list(one) == list(two) and len(two) == 10
    ranks = {two.entries[name]["rank"] for name in two}
    assert ranks == {0, 1}
    for name in one:
        assert torch.equal(one[name].tokens["original"][5], two[name].tokens["original"][5])
