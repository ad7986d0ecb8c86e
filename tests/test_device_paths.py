"""The paths that differ on a GPU, checked on the CPU (and on ``SOAPVIT_TEST_DEVICE`` where one is
set): fitted corrections come back on the host, ``--precision``, the host-side token cache, probe
heads on the backbone's device, pinned batches, one GPU per torchrun rank."""

import dataclasses

import pytest
import torch
from conftest import ToyBackbone, write_noise_images

from soapvit.aggregate.cache import TokenCache
from soapvit.aggregate.heads import ProbeClassifier, make_pool
from soapvit.aggregate.train import ProbeConfig, train_probe
from soapvit.errors import SoapvitError
from soapvit.features import autocast, encode, resolve_device, to_device
from soapvit.fitting import fit, on_host


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_noise_images(tmp_path_factory.mktemp("device") / "images", n=10)


def tensors_of(value, seen=None):
    """Every tensor an object holds (attributes, dicts, lists, dataclasses), written apart from
    :func:`on_host` so that the check does not share its walk."""
    seen = set() if seen is None else seen
    if id(value) in seen or isinstance(value, torch.nn.Module):
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif dataclasses.is_dataclass(value):
        items = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif hasattr(value, "__dict__") and type(value).__module__.startswith("soapvit."):
        items = list(vars(value).values())
    else:
        return []
    return [t for item in items for t in tensors_of(item, seen)]


class OnDevice(torch.Tensor):
    """A tensor that stands for one left on an accelerator: only ``.cpu()`` makes it plain."""

    def cpu(self, *args, **kwargs):
        return torch.Tensor.cpu(self.as_subclass(torch.Tensor), *args, **kwargs)


def test_every_tensor_of_a_fitted_corrections_set_is_on_the_cpu(images, test_device):
    corrections, _ = fit(ToyBackbone(), images, synthetic=6, batch_size=4, device=test_device, methods="all")
    head = corrections.soap
    found = tensors_of(corrections)
    assert len(found) > 10 * len(head.blocks)  # the walk reaches the block decompositions
    assert {t.device.type for t in found} == {"cpu"}
    for name, correction in corrections.items():
        assert {t.device.type for t in correction.state().values()} == {"cpu"}, name
    for d in head.blocks.values():
        assert {getattr(d, f.name).device.type for f in dataclasses.fields(d) if getattr(d, f.name) is not None} == {"cpu"}


def test_on_host_reaches_every_tensor_a_correction_holds(images):
    corrections, _ = fit(ToyBackbone(), images, synthetic=6, batch_size=4, device="cpu", methods="all")
    for correction in corrections.values():
        for holder in [correction, *getattr(correction, "blocks", {}).values()]:
            for name, value in list(vars(holder).items()):
                if isinstance(value, torch.Tensor):
                    setattr(holder, name, value.as_subclass(OnDevice))
        assert any(type(t) is OnDevice for t in tensors_of(correction))
        on_host(correction)
        assert {type(t) for t in tensors_of(correction)} == {torch.Tensor}


def test_precision_fp32_gives_the_si_of_the_default_fit(images, test_device):
    default, _ = fit(ToyBackbone(), images, synthetic=8, batch_size=4, device="cpu", blocks="all")
    fp32, report = fit(ToyBackbone(), images, synthetic=8, batch_size=4, device=test_device, blocks="all",
                       precision="fp32")
    assert report.settings["precision"] == "fp32" and fp32.metadata["precision"] == "fp32"
    for b in default.soap.blocks:
        torch.testing.assert_close(fp32.soap.blocks[b].si, default.soap.blocks[b].si, rtol=0, atol=1e-12 if
                                   test_device.type == "cpu" else 0.02)
    with pytest.raises(SoapvitError, match="--precision"):
        fit(ToyBackbone(), images, synthetic=8, precision="fp16")


def test_fp32_turns_autocast_off_and_encode_takes_it(test_device):
    assert not torch.is_autocast_enabled("cuda")
    with autocast(torch.device("cuda"), "fp32"):
        assert not torch.is_autocast_enabled("cuda")
    with pytest.raises(SoapvitError, match="--precision"):
        autocast(torch.device("cpu"), "half")
    backbone = ToyBackbone().to(test_device).eval()
    x = torch.randn(2, 3, 16, 16, device=test_device)
    feats = encode(backbone, x, "all", precision="fp32")
    with torch.no_grad():
        plain = backbone.forward_features(x, "all")
    torch.testing.assert_close(feats.tokens[1], plain.tokens[1], rtol=0, atol=0)


def test_the_token_cache_kept_on_the_host_gives_the_same_fit(images, test_device):
    on_device, r1 = fit(ToyBackbone(), images, synthetic=6, batch_size=4, device=test_device, blocks="all")
    from soapvit import fitting

    calls = []
    original = fitting.collect_statistics

    def spy(*args, **kwargs):
        calls.append(kwargs.get("device_cache_gb"))
        return original(*args, **{**kwargs, "device_cache_gb": 0.0})

    import unittest.mock

    with unittest.mock.patch.object(fitting, "collect_statistics", spy):
        on_host_, r2 = fit(ToyBackbone(), images, synthetic=6, batch_size=4, device=test_device, blocks="all")
    assert calls and r1.cached and r2.cached
    for b in on_device.soap.blocks:
        torch.testing.assert_close(on_host_.soap.blocks[b].si, on_device.soap.blocks[b].si, rtol=0, atol=0)


def test_probe_heads_train_on_the_given_device_from_a_host_cache(test_device):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 3
    patches = torch.randn(24, 16, 8, generator=g) + labels[:, None, None].float()
    cache = TokenCache(patches.mean(1, keepdim=True).half(), patches.half(), labels, 1, (4, 4), {})
    for pool in ("cls", "abmilp"):
        classifier = ProbeClassifier(make_pool(pool, 8, grid=(4, 4)), 8, 3)
        score = train_probe(classifier, cache, cache, ProbeConfig(epochs=3, batch_size=8), device=test_device)
        assert next(classifier.parameters()).device.type == test_device.type
        assert len(score.history) == 3 and all(isinstance(h, float) for h in score.history)
        assert 0 <= score.top1 <= 1


def test_batches_for_a_gpu_are_pinned_before_the_copy(monkeypatch, test_device):
    x = torch.randn(2, 3, 4, 4)
    assert to_device(x, torch.device("cpu")) is x  # nothing to pin for the CPU
    if test_device.type == "cuda":
        out = to_device(x, test_device)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), x)
        return
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no CUDA here: the copy is faked
    to_device(x, torch.device("cuda", 0))
    assert pinned == [x.shape]


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device(None) == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit index is kept
    assert resolve_device("cpu") == torch.device("cpu")
    from soapvit import distributed

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # setup maps it the same way
    assert distributed.setup(torch.device("cuda")) == torch.device("cuda", 2)
