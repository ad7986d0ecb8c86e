"""Outputs never destroy inputs or old results (issue 19, class 1): every writer goes through one
atomic helper (a unique temporary file beside the target, fsync, rename), an ``--out`` that is
one of the command's inputs or of the wrong kind is refused before any work, a full disk is one
line and leaves the old file, and concurrent saves to one path all succeed."""

import json
import resource
import signal
import threading
from contextlib import contextmanager

import pytest
import torch
from eval_helpers import noise_images, toy_fit


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = noise_images(tmp_path_factory.mktemp("imgs"), 4)
    return folder, toy_fit(folder, batch_size=4).soap


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextmanager
def disk_limit(nbytes):
    """Writes beyond ``nbytes`` per file fail with an OSError, as on a full disk."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, previous)


def test_an_out_that_is_an_input_or_of_the_wrong_kind_is_refused_before_any_work(run_cli, toy, tmp_path):
    images, head = toy
    saved = head.save(tmp_path / "head.safetensors")
    as_html = head.save(tmp_path / "head.html")  # a head whose name an HTML page could take
    photos = snapshot(images)
    before = snapshot(tmp_path)
    cases = [
        (["report", str(saved), "--out", str(saved)], "--out"),
        (["report", str(as_html), "--out", str(as_html)], "is the input"),
        (["fit", "--model", "zoo:mae", "--images", str(images), "--out", str(images / "0.png")], "--out"),
        (["eval", "tokencut", "--model", "zoo:mae", "--images", str(images), "--head", str(saved),
          "--out", str(saved)], "--out"),
        (["plot", str(saved), "--out", str(saved)], "--out"),
        (["pretrain", "--objective", "mae", "--data", str(images), "--out", str(tmp_path)], "--out"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(args)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
    assert snapshot(images) == photos and snapshot(tmp_path) == before


def test_a_full_disk_is_one_line_and_leaves_the_old_report(run_cli, toy, tmp_path):
    _, head = toy
    saved = head.save(tmp_path / "head.safetensors")
    page = tmp_path / "report.html"
    page.write_text("old page " * 200)
    before = snapshot(tmp_path)
    with disk_limit(80_000):  # the figures fit, the page does not
        code, _, err = run_cli(["report", str(saved), "--out", str(page)])
    assert code == 2 and "report.html" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before  # the old page whole, no temporary file left


@pytest.mark.parametrize("writer", ["json", "head", "figure", "checkpoint"])
def test_every_writer_keeps_the_old_file_on_a_full_disk(toy, tmp_path, writer):
    import matplotlib.pyplot as plt

    from soapvit.cli.common import write_json
    from soapvit.errors import SoapvitError
    from soapvit.plots import plot_si_curves
    from soapvit.resume import FitCheckpoint, FitState

    _, head = toy
    target = tmp_path / {"json": "out.json", "head": "h.safetensors", "figure": "si.png",
                         "checkpoint": "rank-0-of-1.safetensors"}[writer]
    target.write_bytes(b"old" * 100)
    state = FitState.fresh([0], (8, 8), 64, torch.device("cpu"))
    write = {
        "json": lambda: write_json(target, {"x": list(range(5000))}),
        "head": lambda: head.save(target),
        "figure": lambda: plot_si_curves({"h": head}, target),
        "checkpoint": lambda: FitCheckpoint(tmp_path, 1, {}).save(state),
    }[writer]
    with disk_limit(2048), pytest.raises(SoapvitError, match="cannot write"):
        write()
    plt.close("all")
    assert snapshot(tmp_path) == {target.name: b"old" * 100}


def test_concurrent_saves_to_one_path_all_succeed(toy, tmp_path):
    from soapvit.cli.common import write_json
    from soapvit.corrections.soap import SoapHead
    from soapvit.resume import FitCheckpoint, FitState

    _, head = toy
    state = FitState.fresh([0, 1], (4, 4), 32, torch.device("cpu"))
    checkpoint = FitCheckpoint(tmp_path / "ckpt", 1, {"fit": 1})
    errors = []

    def work(i):
        try:
            for _ in range(5):
                head.save(tmp_path / "h.safetensors")
                checkpoint.save(state)
                write_json(tmp_path / "key.json", {"i": i})
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert SoapHead.load(tmp_path / "h.safetensors").apply_block == head.apply_block
    assert checkpoint.load(torch.device("cpu")) is not None
    assert json.loads((tmp_path / "key.json").read_text())["i"] in range(6)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]
    assert (tmp_path / "h.safetensors").stat().st_mode & 0o777 == 0o644
