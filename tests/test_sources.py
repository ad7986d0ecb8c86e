"""One reader for --images (folders, file lists, tar shards) and the streamed path of the pipeline."""

import io
import tarfile

import pytest
import torch
from PIL import Image
from conftest import ToyBackbone

from soapvit.data.images import DataFolderError
from soapvit.data.sources import ImageFiles, TarShards, expand_braces, open_images
from soapvit.data.synthetic import SyntheticImages
from soapvit.data.transforms import ImageTransform
from soapvit.distributed import share
from soapvit.features import iter_tokens
from conftest import fit_soap


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((16, 16), 20 + seed).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def write_shard(path, keys, *, broken=(), truncate=False):
    with tarfile.open(path, "w:gz") as tar:
        for key in keys:
            members = {f"{key}.png": b"junk" if key in broken else png(len(tar.getmembers())), f"{key}.cls": b"3"}
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if truncate:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.fixture()
def shards(tmp_path):
    for s in range(3):
        write_shard(tmp_path / f"train-{s:06d}.tar.gz", [f"s{s}_{i}" for i in range(4)], broken={"s1_2"})
    return tmp_path


def test_brace_patterns_expand_like_a_shell():
    assert expand_braces("d/train-{000008..000010}.tar") == [f"d/train-0000{n:02d}.tar" for n in (8, 9, 10)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_open_images_folder_list_and_shards(tmp_path, shards):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for path in (folder / "b.png", folder / "sub" / "a.jpg", folder / ".hidden" / "c.png", folder / ".d.png"):
        Image.new("RGB", (8, 8)).save(path)
    (folder / "notes.txt").write_text("x")
    assert open_images(folder).files == [folder / "b.png", folder / "sub" / "a.jpg"]
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text("# two images\n../imgs/b.png\n\n../imgs/sub/a.jpg\n")
    assert open_images(listing, limit=1) == ImageFiles([listing.parent / "../imgs/b.png"])
    stream = open_images(f"{shards}/train-{{000000..000002}}.tar.gz", limit=5)
    assert isinstance(stream, TarShards) and len(stream.shards) == 3 and stream.limit == 5
    with pytest.raises(DataFolderError, match="train-000003.tar.gz does not exist"):
        open_images(f"{shards}/train-{{000002..000003}}.tar.gz")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(DataFolderError, match="names no image"):
        open_images(empty)


@pytest.mark.parametrize("limit", [None, 7])
@pytest.mark.parametrize("readers", [1, 2, 3, 5])
def test_stream_readers_split_every_sample_once(shards, limit, readers):
    source = TarShards(sorted(shards.glob("*.tar.gz")), limit)
    read = [[(index, name) for index, name, _ in source.stream(r, readers)] for r in range(readers)]
    everything = sorted(item for part in read for item in part)
    names = [name for _, name in everything]
    assert len(names) == len(set(names)) == (limit or 12)
    in_order = [(s, i) for s in range(3) for i in range(4)][: limit or 12]
    assert [divmod(index, 2**32) for index, _ in everything] == in_order


def test_pipeline_streams_shards_with_workers_and_logs_bad_samples(shards):
    backbone = ToyBackbone()
    transform = ImageTransform.for_backbone(backbone, size=16, mode="square")
    source = TarShards(sorted(shards.glob("*.tar.gz")))
    batches = list(iter_tokens(backbone, source, transform, batch_size=2, num_workers=2, log=(log := _log())))
    indices = sorted(i for b in batches for i in b.indices)
    assert len(indices) == len(set(indices)) == 11
    assert [entry["file"] for entry in log.skipped] == ["train-000001.tar.gz:s1_2"]
    whole = torch.cat([b.original.tokens[1] for b in iter_tokens(backbone, source, transform, batch_size=2)])
    assert whole.shape[0] == 11


def test_damaged_shard_keeps_earlier_samples_and_fit_runs_on_shards(tmp_path):
    write_shard(tmp_path / "a.tar.gz", [f"k{i}" for i in range(6)])
    write_shard(tmp_path / "b.tar.gz", [f"k{i}" for i in range(40)], truncate=True)
    head, report = fit_soap(ToyBackbone(), f"{tmp_path}/{{a,b}}.tar.gz", synthetic=3, batch_size=4, device="cpu")
    assert 6 < report.n_real < 46 and report.n_synthetic == 3
    assert any(entry["file"].endswith("b.tar.gz") and "unreadable" in entry["reason"] for entry in report.skipped)
    assert head.metadata["n_real"] == report.n_real


def test_synthetic_images_do_not_depend_on_batches_or_ranks():
    fakes = SyntheticImages(7, 16, "mixture", seed=3)
    whole = torch.cat(list(fakes.batches(7)))
    torch.testing.assert_close(torch.cat(list(fakes.batches(3))), whole, rtol=0, atol=0)
    starts = list(range(0, 7, 2))
    dealt = {start: fakes.images(range(start, min(start + 2, 7))) for rank in range(3) for start in share(starts, rank, 3)}
    torch.testing.assert_close(torch.cat([dealt[s] for s in starts]), whole, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(list(fakes.batches(2, start_step=2))), whole[4:], rtol=0, atol=0)


def _log():
    from soapvit.runlog import RunLog

    return RunLog()
