"""Heads on the Hugging Face Hub: ``--head hf:user/repo[@revision]`` from a local cache with the network
off, and ``soapvit push`` up to the requests it would send."""

import json
import shutil
import socket
import time
from pathlib import Path

import huggingface_hub.constants  # noqa: F401  (imported first: it reads HF_HUB_CACHE once; the tests set it later)
import pytest
from test_extract import ASSETS, fit_head

from soapvit.cli.common import load_corrections
from soapvit.corrections import CorrectionSet
from soapvit.corrections.soap import removed
from soapvit.errors import SoapvitError
from soapvit.hub import model_card, parse_spec, resolve_head

MAIN, DEV = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def head_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    return fit_head(folder / "last.safetensors"), fit_head(folder / "early.safetensors", apply_block=2, blocks=[2, 5])


@pytest.fixture()
def no_network(monkeypatch):
    """Every TCP connection fails, and a download would be an error."""
    def refuse(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("tried to download"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, head_files):
    """``user/soap-mae`` in the Hub cache layout: main → the last-block head, branch dev → the early one
    (blobs and snapshot symlinks, as huggingface_hub writes them)."""
    cache = tmp_path / "hub"
    repo = cache / "models--user--soap-mae"
    for ref, commit, head in (("main", MAIN, head_files[0]), ("dev", DEV, head_files[1])):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        blob = repo / "blobs" / f"blob-{ref}"
        blob.parent.mkdir(exist_ok=True)
        shutil.copy(head, blob)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "corrections.safetensors").symlink_to(Path("..", "..", "blobs", blob.name))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_parse_spec():
    assert parse_spec("hf:user/repo") == ("user/repo", None, None)
    assert parse_spec("hf:user/repo@v2") == ("user/repo", None, "v2")
    assert parse_spec("hf:user/repo/heads/b11.safetensors@" + MAIN) == ("user/repo", "heads/b11.safetensors", MAIN)
    for bad in ("hf:user", "hf:user/repo@", "hf:"):
        with pytest.raises(SoapvitError, match="hf:user/repo\\[@revision\\]"):
            parse_spec(bad)


def test_a_head_in_the_hub_cache_loads_with_the_network_off(hub_cache, no_network, head_files):
    start = time.monotonic()
    main = load_corrections(Path("hf:user/soap-mae"))
    dev = load_corrections(Path("hf:user/soap-mae@dev"), "soap")
    by_commit = load_corrections(Path(f"hf:user/soap-mae@{DEV}"))
    assert time.monotonic() - start < 5
    assert main["soap"].digest() == CorrectionSet.load(head_files[0])["soap"].digest() and main["soap"].block_ == 5
    assert list(dev) == ["soap"] and dev["soap"].block_ == 2
    assert by_commit["soap"].digest() == dev["soap"].digest()
    assert resolve_head("hf:user/soap-mae/corrections.safetensors") == \
        hub_cache / "models--user--soap-mae" / "snapshots" / MAIN / "corrections.safetensors"


def test_extract_with_a_hub_head_offline_records_it(hub_cache, no_network, tmp_path, run_cli, head_files):
    from soapvit.extract import file_digest

    out = tmp_path / "features"
    code, _, err = run_cli(["extract", "--model", "zoo:mae", "--head", "hf:user/soap-mae", "--images", ASSETS,
                            "--limit", "2", "--out", str(out), "--device", "cpu"])
    assert code in (0, None), err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["head"] == {"spec": "hf:user/soap-mae", "sha256": file_digest(head_files[0])}
    assert manifest["variants"] == ["original", "soap", "posmean"]


def test_not_in_the_cache_and_offline_is_one_clear_error(hub_cache, no_network, run_cli):
    code, _, err = run_cli(["extract", "--model", "zoo:mae", "--head", "hf:user/other", "--images", ASSETS,
                            "--out", str(hub_cache.parent / "x"), "--device", "cpu"])
    assert code == 2
    assert "not in the local Hugging Face cache" in " ".join(err.split()) and "hub is not reachable" in " ".join(err.split())


def test_push_sends_the_file_and_a_generated_card(tmp_path, monkeypatch, run_cli, head_files):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(("create_repo", a, k))
                        or "https://huggingface.co/user/soap-mae")
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **k: calls.append(("upload_file", (), k)))
    evaluation = {"kind": "tokencut", "results": {"original": {"maxFbeta": 61.25, "iou": 50.5},
                                                  "soap": {"maxFbeta": 64.75, "iou": 53.125}}}
    (tmp_path / "ecssd.json").write_text(json.dumps(evaluation))
    code, _, err = run_cli(["push", str(head_files[0]), "user/soap-mae", "--eval", str(tmp_path / "ecssd.json")])
    assert code in (0, None), err
    assert [c[0] for c in calls] == ["create_repo", "upload_file", "upload_file"]
    assert calls[0][1] == ("user/soap-mae",) and calls[0][2] == {"repo_type": "model", "private": False, "exist_ok": True}
    upload = calls[1][2]
    assert upload["path_or_fileobj"] == str(head_files[0]) and upload["path_in_repo"] == "corrections.safetensors"
    assert upload["repo_id"] == "user/soap-mae" and upload["revision"] is None
    card = calls[2][2]
    assert card["path_in_repo"] == "README.md" and card["repo_id"] == "user/soap-mae"
    text = card["path_or_fileobj"].decode()
    assert text == model_card(CorrectionSet.load(head_files[0]), repo="user/soap-mae",
                              evaluations=[("ecssd.json", evaluation)])
    head = CorrectionSet.load(head_files[0])["soap"]
    d = head.blocks[5]
    cut = removed(d.weights)
    assert cut  # the head removes something: the card lists each with its SI and weight
    for c in cut:
        assert f"| PC{c + 1} | {float(d.si[c]):.3f} | {float(d.weights[c]):.3f} |" in text
    assert text.startswith("---\nlibrary_name: soapvit\n")
    assert "| backbone | `zoo:mae` |" in text and "mixture (version 3)" in text and "10 real, 6 synthetic" in text
    assert "### tokencut (`ecssd.json`)" in text
    assert "| variant | iou | maxFbeta |" in text and "| soap | 53.125 | 64.750 |" in text
    assert "--head hf:user/soap-mae" in text


def test_push_refuses_a_bad_repo_id_before_any_request(head_files, monkeypatch):
    from huggingface_hub import HfApi

    from soapvit.hub import push_head

    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("sent a request"))
    with pytest.raises(SoapvitError, match="user/name"):
        push_head(head_files[0], "no-slash")
