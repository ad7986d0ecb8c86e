import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soapvit.data.images import DataFolderError
from soapvit.data.shards import load_labelled_shards, shard_files

TINY_IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet"


def _encoded(value: int, side: int = 8, fmt: str = "PNG") -> bytes:
    """A flat image whose grey level identifies the sample."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (value,) * 3).save(buffer, fmt)
    return buffer.getvalue()


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, value: int, label: bytes | None, image: bytes | None = None, ext: str = "png"):
    members = [(f"{key}.{ext}", image if image is not None else _encoded(value))]
    return members + ([(f"{key}.cls", label)] if label is not None else [])


@pytest.fixture
def shards(tmp_path):
    """Two shards; grey level 10·i belongs to label i, every bad sample sits between good ones."""
    _write_shard(tmp_path / "train-000000.tar", [
        *_sample("a0", 10, b"1"),
        *_sample("a1", 250, b"cat"),
        *_sample("a2", 20, b" 2\n"),
        *_sample("a3", 250, None),
        *_sample("a4", 30, b"3", ext="jpg", image=_encoded(30, fmt="JPEG")),
    ])
    _write_shard(tmp_path / "train-000001.tar.gz", [
        *_sample("b0", 250, b"7", image=b"not an image"),
        *_sample("b1", 40, b"4"),
        *_sample("b2", 250, b"-1"),
        *_sample("b3", 50, b"5"),
    ])
    (tmp_path / "val-000000.tar").write_bytes(b"")
    (tmp_path / "train-notes.txt").write_text("not a shard")
    return tmp_path


def test_shard_files_are_the_sorted_shards_of_one_split(shards):
    assert [p.name for p in shard_files(shards, "train")] == ["train-000000.tar", "train-000001.tar.gz"]
    with pytest.raises(DataFolderError, match=r"--data: no 'test-\*.tar\[.gz\]' shards in"):
        shard_files(shards, "test")
    with pytest.raises(DataFolderError, match="--train: folder .*missing does not exist"):
        shard_files(shards / "missing", "train", what="--train")


def test_bad_samples_are_skipped_without_shifting_labels(shards):
    with pytest.warns(UserWarning) as caught:
        images, labels = load_labelled_shards(shards, "train")
    assert labels.tolist() == [1, 2, 3, 4, 5]
    grey = images.float().mean(dim=(1, 2, 3))
    np.testing.assert_allclose(grey.numpy(), 10 * labels.numpy(), atol=1)
    message = str(caught[0].message)
    assert message.startswith("skipped 4 unreadable sample(s) of the 'train' shards in")
    for reason in ["train-000000.tar:a1: label 'cat' is not an integer", "train-000000.tar:a3: no .cls label",
                   "cannot read image train-000001.tar.gz:b0:", "train-000001.tar.gz:b2: label -1 is negative"]:
        assert reason in message


def test_sizes_resize_and_limit(shards):
    with pytest.warns(UserWarning):
        images, labels = load_labelled_shards(shards, "train", size=4, limit=3)
    assert images.shape == (3, 3, 4, 4) and images.dtype.is_floating_point is False
    assert labels.tolist() == [1, 2, 3]
    np.testing.assert_allclose(images.float().mean(dim=(1, 2, 3)).numpy(), [10, 20, 30], atol=1)


def test_images_of_different_sizes_need_a_size(tmp_path):
    _write_shard(tmp_path / "train-0.tar", [*_sample("a", 10, b"0"), *_sample("b", 10, b"1", image=_encoded(10, 6))])
    with pytest.raises(DataFolderError, match="sample train-0.tar:b is 6x6 but the first .* is 8x8: give an image size"):
        load_labelled_shards(tmp_path, "train")
    images, _ = load_labelled_shards(tmp_path, "train", size=6)
    assert images.shape == (2, 3, 6, 6)


def test_a_truncated_gzip_shard_keeps_the_samples_before_the_damage(tmp_path):
    members = [member for i in range(6) for member in _sample(f"k{i}", 10 * i, str(i).encode())]
    data = _write_shard(tmp_path / "full.tar.gz", members).read_bytes()
    (tmp_path / "train-0.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    with pytest.warns(UserWarning, match=r"train-0.tar.gz: unreadable after \d samples"):
        images, labels = load_labelled_shards(tmp_path, "train")
    assert 0 < len(labels) < 6 and labels.tolist() == list(range(len(labels)))
    np.testing.assert_allclose(images.float().mean(dim=(1, 2, 3)).numpy(), 10 * labels.numpy(), atol=1)


def test_no_readable_sample_is_an_error(tmp_path):
    _write_shard(tmp_path / "train-0.tar", _sample("a", 10, b"x"))
    with pytest.warns(UserWarning), pytest.raises(DataFolderError, match="no readable samples in the 'train' shards"):
        load_labelled_shards(tmp_path, "train")


def test_tiny_imagenet_validation_shard():
    if not TINY_IMAGENET.is_dir():
        pytest.skip("shared Tiny-ImageNet not present")
    images, labels = load_labelled_shards(TINY_IMAGENET, "val", limit=20)
    assert images.shape == (20, 3, 64, 64)
    assert labels.min() >= 0 and labels.max() < 200
