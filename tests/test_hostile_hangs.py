"""Nothing a user feeds may hang a run (issue 19, class 4): only regular files are read as images."""

import os
import signal

import numpy as np
import pytest
import torch
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


def test_a_brace_range_of_millions_stops_at_the_first_missing_shard(tmp_path, deadline, monkeypatch):
    import io
    import tarfile

    from soapvit.data import sources
    from soapvit.data.images import DataFolderError

    with tarfile.open(tmp_path / "s-00000000.tar", "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    stats = []
    real_is_file = sources.Path.is_file

    def counting(self):
        stats.append(self)
        return real_is_file(self)

    monkeypatch.setattr(sources.Path, "is_file", counting)
    pattern = f"{tmp_path}/s-{{00000000..29999999}}.tar"
    with pytest.raises(DataFolderError) as err:
        sources.open_images(pattern)
    message = str(err.value)
    assert pattern in message and "s-00000001.tar does not exist" in message and "\n" not in message
    assert len(stats) <= 3, len(stats)


def test_a_brace_pattern_naming_too_many_shards_is_refused(tmp_path, deadline, monkeypatch):
    import io
    import tarfile

    from soapvit.data import sources
    from soapvit.data.images import DataFolderError

    for i in range(3):
        with tarfile.open(tmp_path / f"s-{i}.tar", "w") as tar:
            info = tarfile.TarInfo("a.jpg")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    monkeypatch.setattr(sources, "MAX_SHARDS", 2)
    with pytest.raises(DataFolderError, match="more than 2 shards"):
        sources.open_images(f"{tmp_path}/s-{{0..2}}.tar")


def _png_bytes(rng, size=16):
    import io

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_tar_member_beyond_the_size_bound_is_skipped_unread_and_named(tmp_path, deadline, monkeypatch):
    import io
    import tarfile

    from soapvit.data import shards
    from soapvit.fitting import fit

    rng = np.random.default_rng(0)
    members = {f"{i}.png": _png_bytes(rng) for i in range(4)}
    members["big.png"] = _png_bytes(rng, 64)
    limit = max(len(members[f"{i}.png"]) for i in range(4))
    assert len(members["big.png"]) > limit
    with tarfile.open(tmp_path / "train-0.tar", "w") as tar:
        for name, data in members.items():
            for member, payload in ((name, data), (name.replace(".png", ".cls"), b"1")):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", limit)
    read = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: read.append(m.name) or real(self, m))

    _, report = fit(ToyBackbone(), tmp_path / "train-0.tar", synthetic=4, batch_size=5, device="cpu", blocks="last")
    assert report.n_real == 4
    assert "big.png" not in read
    lines = report.log.lines()
    assert any("train-0.tar:big.png" in line and "MAX_MEMBER_BYTES" in line for line in lines), lines
    assert not any("BytesIO" in line for line in lines), lines

    with pytest.warns(UserWarning, match="train-0.tar:big.png"):
        images, labels = shards.load_labelled_shards(tmp_path, "train")
    assert len(labels) == 4


def test_an_undecodable_tar_member_is_named_without_a_stream_repr(tmp_path, deadline):
    import io

    from soapvit.data.images import ImageReadError, load_image

    with pytest.raises(ImageReadError) as err:
        load_image(io.BytesIO(b"not an image"), name="train-0.tar:x")
    assert "train-0.tar:x" in str(err.value) and "BytesIO" not in str(err.value) and "0x" not in str(err.value)


def test_a_huge_photo_under_aspect_resize_is_capped_in_tokens_with_a_warning_naming_it(tmp_path, deadline):
    from soapvit.data.images import load_image
    from soapvit.data.transforms import ImageTransform

    Image.new("RGB", (4000, 3000), (120, 30, 200)).save(tmp_path / "photo.png")
    transform = ImageTransform.for_backbone(ToyBackbone(), mode="aspect")
    p = transform.patch_size
    width, height = transform.output_size(4000, 3000)  # what the batch planner groups by
    assert (width // p) * (height // p) <= transform.max_tokens and abs(width / height - 4 / 3) < 0.05
    assert transform.output_size(40, 30) == transform._uncapped_size(40, 30)
    with pytest.warns(UserWarning, match=r"image .*photo\.png .*MAX_TOKENS.*downscaled to") as caught:
        pixels = transform(load_image(tmp_path / "photo.png"))
    assert tuple(pixels.shape) == (3, height, width)
    assert len(caught) == 1
    with pytest.warns(UserWarning, match="MAX_TOKENS"):  # uint8 tensors (images held in memory) too
        assert tuple(transform(torch.zeros(3, 3000, 4000, dtype=torch.uint8)).shape) == (3, height, width)


@pytest.mark.parametrize("extra,needle", [([], "interrupted"),
                                          (["--checkpoint", "{tmp}/state"], "run the same command again")])
def test_ctrl_c_prints_one_line_saying_so_and_how_to_continue(run_cli, tmp_path, monkeypatch, extra, needle):
    from soapvit.cli import soap_commands

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(soap_commands, "run_fit", interrupted)
    (tmp_path / "imgs").mkdir()
    args = ["fit", "--model", "zoo:mae", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "h.safetensors"),
            *[a.format(tmp=tmp_path) for a in extra]]
    code, _, err = run_cli(args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130 and len(lines) == 1 and "interrupted" in lines[0] and needle in lines[0], err
    if extra:
        assert str(tmp_path / "state") in lines[0]
