"""Nothing a user feeds may hang a run (issue 19, class 4): only regular files are read as images."""

import os
import signal

import numpy as np
import pytest
from conftest import ToyBackbone
from PIL import Image


@pytest.fixture()
def deadline():
    """Fail (instead of hanging the suite) when the test runs past 60 s."""
    def expire(*_):
        raise TimeoutError("hung")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_in_a_file_list_is_skipped_not_read(tmp_path, deadline):
    from soapvit.fitting import fit

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    os.mkfifo(tmp_path / "pipe.png")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(["0.png", "pipe.png", "1.png", "2.png", "3.png"]))
    _, report = fit(ToyBackbone(), listing, synthetic=4, batch_size=5, device="cpu", blocks="last")
    assert report.n_real == 4
    assert any("pipe.png" in line and "FIFO" in line for line in report.log.lines()), report.log.lines()
