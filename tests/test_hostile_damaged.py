"""Damaged files are refused, never trusted (issue 19, class 2): a corrections file, a fit
``--checkpoint`` and the probe feature cache are each checked on load (finite tensors, consistent
shapes, values in range, counts that match their digest) with a one-line reason naming the file."""

import json
import warnings

import pytest
import torch
from conftest import ToyBackbone
from eval_helpers import noise_images, toy_fit
from safetensors import safe_open
from safetensors.torch import save_file

from soapvit.errors import SoapvitError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return noise_images(tmp_path_factory.mktemp("imgs"), 6)


@pytest.fixture(scope="module")
def head_file(images, tmp_path_factory):
    return toy_fit(images, batch_size=3).save(tmp_path_factory.mktemp("head") / "head.safetensors")


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def tamper(path, out, edit):
    """A copy of safetensors file ``path`` at ``out`` with ``edit(tensors, metadata)`` applied."""
    tensors, meta = read(path)
    edit(tensors, meta)
    save_file(tensors, str(out), metadata=meta)
    return out


def set_tensor(key, value):
    def edit(tensors, meta):
        tensors[key] = value(tensors[key]).contiguous()
    return edit


def set_description(change):
    def edit(tensors, meta):
        described = json.loads(meta["corrections"])
        change(described)
        meta["corrections"] = json.dumps(described)
    return edit


def nan_at(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


DAMAGED_HEADS = {
    "nan mean": set_tensor("block.1.mean", nan_at),
    "inf projector": set_tensor("projector", lambda t: t * float("inf")),
    "weights above 1": set_tensor("block.1.weights", lambda t: t + 1.5),
    "negative weights": set_tensor("block.0.weights", lambda t: t - 1),
    "negative eigenvalues": set_tensor("block.1.eigenvalues", lambda t: t - 10 * t.abs().max()),
    "short eigenvectors": set_tensor("block.1.eigenvectors", lambda t: t[:-1]),
    "short si": set_tensor("block.0.si", lambda t: t[:-2]),
    "no blocks": set_description(lambda d: d["soap"].update(blocks=[])),
    "apply block not fitted": set_description(lambda d: d["soap"].update(block=7)),
    "no corrections": set_description(lambda d: d.clear()),
}


@pytest.mark.parametrize("case", DAMAGED_HEADS)
def test_a_damaged_corrections_file_is_refused_in_one_line(run_cli, head_file, tmp_path, case):
    bad = tamper(head_file, tmp_path / "bad.safetensors", DAMAGED_HEADS[case])
    code, out, err = run_cli(["inspect", str(bad)])
    assert code == 2 and "damaged" in err and str(bad) in err and len(err.strip().splitlines()) == 1, (out, err)
    assert "--apply-block" not in err


def test_an_intact_head_still_loads(head_file):
    from soapvit.corrections import CorrectionSet

    assert "soap" in CorrectionSet.load(head_file)


@pytest.fixture()
def checkpoint(images, tmp_path):
    """A finished fit's checkpoint folder (the fit ran with --checkpoint)."""
    from soapvit.fitting import fit

    folder = tmp_path / "ckpt"
    fit(ToyBackbone(), images, synthetic=4, batch_size=3, device="cpu", blocks="all", checkpoint=folder,
        checkpoint_every=1)
    (path,) = folder.glob("rank-*.safetensors")
    return folder, path


def set_position(key, value):
    def edit(tensors, meta):
        info = json.loads(meta["soapvit"])
        info["position"][key] = value
        meta["soapvit"] = json.dumps(info)
    return edit


def drop(key):
    def edit(tensors, meta):
        del tensors[key]
    return edit


DAMAGED_CHECKPOINTS = {
    "nan moments": set_tensor("moments.0.mean", nan_at),
    "inf scatter": set_tensor("moments.1.scatter", lambda t: t * float("inf")),
    "edited n_real": set_position("n_real", 1000),
    "edited real_steps": set_position("real_steps", 1),
    "negative count": set_position("synthetic_steps", -1),
    "missing key": drop("real.0.raw"),
    "non-JSON metadata": lambda tensors, meta: meta.update(soapvit="{not json"),
}


@pytest.mark.parametrize("case", DAMAGED_CHECKPOINTS)
def test_a_damaged_checkpoint_is_refused_naming_the_file(images, checkpoint, case):
    from soapvit.fitting import fit

    folder, path = checkpoint
    tamper(path, path, DAMAGED_CHECKPOINTS[case])
    with pytest.raises(SoapvitError, match="damaged") as info:
        fit(ToyBackbone(), images, synthetic=4, batch_size=3, device="cpu", blocks="all", checkpoint=folder,
            checkpoint_every=1)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_resumed_head_records_the_state_it_continued(images, checkpoint):
    from soapvit.fitting import fit

    folder, _ = checkpoint
    corrections, _ = fit(ToyBackbone(), images, synthetic=4, batch_size=3, device="cpu", blocks="all",
                         checkpoint=folder, checkpoint_every=1)
    assert len(corrections.soap.metadata["resumed_from"]) == 64


def toy_data(n=6, size=16):
    from soapvit.data.labelled import LabelledImages

    g = torch.Generator().manual_seed(0)
    return LabelledImages(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                          torch.arange(n) % 2, {"toy": 0, "n": n})


@pytest.mark.parametrize("damage", ["nan", "short"])
def test_a_damaged_probe_cache_part_is_encoded_again_with_a_warning(tmp_path, damage):
    from soapvit.aggregate.cache import encode_images

    backbone, data = ToyBackbone(), toy_data()
    first = encode_images(backbone, data, image_size=16, cache_dir=tmp_path, part_size=4)["original"]
    (part,) = [p for p in tmp_path.rglob("part-00000.safetensors")]
    tensors = read(part)[0]
    if damage == "nan":
        tensors["original.patches"][1, 2, 3] = float("nan")
    else:
        tensors = {k: v[:2].contiguous() for k, v in tensors.items()}
    save_file(tensors, str(part))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = encode_images(backbone, data, image_size=16, cache_dir=tmp_path, part_size=4)["original"]
    assert any("damaged" in str(w.message) and str(part) in str(w.message) for w in caught), caught
    assert torch.equal(again.patches, first.patches) and again.meta["parts_from_cache"] == 1


def test_the_probe_cache_honours_soapvit_cache(monkeypatch, tmp_path):
    from soapvit.cli import probe

    monkeypatch.setenv("SOAPVIT_CACHE", str(tmp_path / "c"))
    assert probe.default_cache() == tmp_path / "c" / "probe"
