"""Wrong numbers never pass with exit 0 (issue 19, class 3): one rule for counts in every
command, --threads capped at the core count, pretrain options checked before the data is read,
a resume of another objective refused, file names printed literally, dangling links listed."""

import os

import numpy as np
import pytest
import torch
from conftest import ToyBackbone
from eval_helpers import noise_images, toy_fit
from PIL import Image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return noise_images(tmp_path_factory.mktemp("imgs"), 5)


@pytest.fixture(scope="module")
def head(images, tmp_path_factory):
    return toy_fit(images).soap.save(tmp_path_factory.mktemp("head") / "head.safetensors")


COUNT_CASES = [
    (["plot", "{head}", "--out", "{tmp}/figs", "--images", "{images}", "--count", "-1"], "--count"),
    (["plot", "{head}", "--out", "{tmp}/figs", "--images", "{images}", "--count", "0"], "--count"),
    (["report", "{head}", "--out", "{tmp}/r.html", "--images", "{images}", "--count", "-2"], "--count"),
    (["eval", "tokencut", "--model", "zoo:mae", "--images", "{images}", "--limit", "-1"], "--limit"),
    (["attention", "--model", "zoo:mae", "--images", "{images}", "--out", "{tmp}/a", "--limit", "-5"], "--limit"),
    (["fit", "--model", "zoo:mae", "--images", "{images}", "--out", "{tmp}/h.safetensors", "--limit", "-3"],
     "--limit"),
    (["pretrain", "--objective", "mae", "--data", "{images}", "--out", "{tmp}/c.pt", "--limit", "0"], "--limit"),
    (["probe", "--model", "zoo:mae", "--train", "{images}", "--val", "{images}", "--per-class", "-1"],
     "--per-class"),
]


@pytest.mark.parametrize("args,needle", COUNT_CASES, ids=[" ".join(a[:2]) + " " + a[-2] + a[-1] for a, _ in COUNT_CASES])
def test_counts_below_one_are_refused_by_every_command(run_cli, images, head, tmp_path, args, needle):
    args = [a.format(head=head, images=images, tmp=tmp_path) for a in args]
    code, _, err = run_cli(args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "figs").exists() and not (tmp_path / "r.html").exists()


def test_threads_beyond_the_cores_are_capped_with_a_warning(capsys):
    from soapvit.cli.common import available_cores, set_threads

    try:
        assert set_threads(999) == available_cores()
        assert torch.get_num_threads() == available_cores()
    finally:
        torch.set_num_threads(1)
    assert "--threads 999" in capsys.readouterr().err


PRETRAIN_CASES = [
    (["--depth", "0"], "--depth"),
    (["--patch-size", "0"], "--patch-size"),
    (["--patch-size", "7"], "--patch-size"),
    (["--embed-dim", "97"], "--embed-dim"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--epochs", "nan"], "--epochs"),
    (["--num-heads", "0"], "--num-heads"),
    (["--max-steps", "0"], "--max-steps"),
]


@pytest.mark.parametrize("extra,needle", PRETRAIN_CASES, ids=[" ".join(a) for a, _ in PRETRAIN_CASES])
def test_pretrain_options_are_checked_before_the_data_is_read(run_cli, tmp_path, extra, needle):
    # --data names no shards: an option error must come first, before any data is looked at
    code, _, err = run_cli(["pretrain", "--objective", "mae", "--data", str(tmp_path / "none"),
                            "--out", str(tmp_path / "c.pt"), *extra])
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_pretrain_refuses_to_resume_another_objective(run_cli, tmp_path):
    from soapvit.pretrain import TrainConfig

    from dataclasses import asdict

    checkpoint = tmp_path / "smim.pt"
    torch.save({"train_config": asdict(TrainConfig("semanticmim")), "num_classes": 2}, checkpoint)
    code, _, err = run_cli(["pretrain", "--objective", "mae", "--data", str(tmp_path / "none"),
                            "--out", str(tmp_path / "c.pt"), "--resume", str(checkpoint)])
    assert code == 2 and "semanticmim" in err and "--objective" in err, err


def test_file_names_are_printed_literally(capsys):
    from soapvit.cli.common import print_log
    from soapvit.runlog import RunLog

    class Result:
        warnings = ["odd name :fire: [bold]x[/bold]"]
        log = RunLog()

    Result.log.skip(":bomb:[red].jpg", "cannot decode")
    print_log(Result)
    err = capsys.readouterr().err
    assert ":bomb:[red].jpg" in err and ":fire: [bold]x[/bold]" in err


def test_a_dangling_link_in_an_image_folder_is_listed_as_skipped(tmp_path):
    from soapvit.fitting import fit

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    os.symlink(tmp_path / "gone.png", folder / "link.png")
    _, report = fit(ToyBackbone(), folder, synthetic=4, batch_size=4, device="cpu", blocks="last")
    assert report.n_real == 4
    assert any("link.png" in line for line in report.log.lines()), report.log.lines()
