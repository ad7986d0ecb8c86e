"""Tracebacks where a one-line error belongs (issue 19, class 5): every case ends in one line
naming what is wrong (exit 2 on the command line), never a traceback."""

import json
import warnings

import pytest
import torch
from conftest import ToyBackbone
from eval_helpers import noise_images, toy_fit
from PIL import Image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return noise_images(tmp_path_factory.mktemp("imgs"), 4)


@pytest.fixture(scope="module")
def head(images, tmp_path_factory):
    return toy_fit(images).soap.save(tmp_path_factory.mktemp("head") / "head.safetensors")


def one_line(code, err):
    lines = [line for line in err.splitlines() if line.strip()]
    return code == 2 and len(lines) == 1 and "Traceback" not in err


def test_symlink_loops_in_a_folder_scan_are_skipped_never_followed_twice(tmp_path):
    from soapvit.data.images import list_images

    sub = tmp_path / "sub"
    sub.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(sub / f"{i}.png")
    (sub / "back").symlink_to("..")  # a directory loop
    (tmp_path / "again").symlink_to("sub")  # the same folder twice
    (tmp_path / "self.png").symlink_to("self.png")  # a file loop
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = list_images(tmp_path, recursive=True)
    assert sorted(p.name for p in files) == ["0.png", "1.png", "self.png"]
    notes = [str(w.message) for w in caught]
    assert any("back" in n and "not followed twice" in n for n in notes), notes


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1"])
def test_a_seed_beyond_its_range_is_one_line(run_cli, images, tmp_path, seed):
    code, _, err = run_cli(["fit", "--model", "zoo:mae", "--images", str(images), "--out",
                            str(tmp_path / "h.safetensors"), "--seed", seed])
    assert one_line(code, err) and "--seed" in err, err


@pytest.mark.parametrize("option,value", [("--figure", "fig.txt"), ("--save-masks", "afile")])
def test_figure_and_mask_outputs_of_the_wrong_kind_are_refused(run_cli, images, tmp_path, option, value):
    (tmp_path / "afile").write_text("keep")
    code, _, err = run_cli(["eval", "tokencut", "--model", "zoo:mae", "--images", str(images), option,
                            str(tmp_path / value)])
    assert one_line(code, err) and option in err, err
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("content", ["[1, 2]", "not json {", "{\"kind\": \"tokencut\"}"])
def test_report_eval_that_is_no_evaluation_is_one_line(run_cli, head, tmp_path, content):
    bad = tmp_path / "eval.json"
    bad.write_text(content)
    code, _, err = run_cli(["report", str(head), "--out", str(tmp_path / "r.html"), "--eval", str(bad)])
    assert one_line(code, err) and "eval.json" in err, err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("option", ["--out", "--export"])
def test_pretrain_outputs_naming_a_folder_are_refused_before_training(run_cli, images, tmp_path, option):
    folder = tmp_path / "dir"
    folder.mkdir()
    args = ["pretrain", "--objective", "mae", "--data", str(images),
            "--out", str(folder if option == "--out" else tmp_path / "c.pt")]
    if option == "--export":
        args += ["--export", str(folder)]
    code, _, err = run_cli(args)
    assert one_line(code, err) and option in err and "folder" in err, err
    assert not (tmp_path / "c.pt").exists()


def test_soapvit_cache_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    from soapvit.backbones.wheels import cache_dir
    from soapvit.errors import SoapvitError

    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("SOAPVIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SoapvitError, match=r"\$SOAPVIT_CACHE .*cache is a file"):
        cache_dir()


def test_probe_cache_that_is_a_file_is_refused_before_any_work(run_cli, images, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("SOAPVIT_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(["probe", "--model", "zoo:mae", "--train", str(images), "--val", str(images)])
    assert one_line(code, err) and "cache" in err, err


def test_an_hf_folder_whose_config_disagrees_with_its_weights_is_one_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    from soapvit.backbones import load
    from soapvit.errors import SoapvitError

    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=28, patch_size=14)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "ok")
    for name, change in (("wider", {"hidden_size": 64, "intermediate_size": 128}), ("deeper", {"num_hidden_layers": 4})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes())
        edited = json.loads((tmp_path / "ok" / "config.json").read_text()) | change
        (folder / "config.json").write_text(json.dumps(edited))
        with pytest.raises(SoapvitError, match="config.json disagrees with its weights") as err:
            load(f"hf:{folder}")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("pixels", [torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(3, 16, 16),
                                    torch.zeros(1, 1, 16, 16), [[0.0]]], ids=["uint8", "3d", "1ch", "list"])
def test_forward_features_says_what_pixels_must_be(pixels):
    from soapvit.errors import SoapvitError

    with pytest.raises(SoapvitError, match=r"pixels must be a float tensor \(B, 3, H, W\)"):
        ToyBackbone().forward_features(pixels)


def test_forward_features_takes_float64_pixels():
    feats = ToyBackbone().forward_features(torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    assert feats is not None


def test_no_threads_help_carries_the_development_note_about_openmp(run_cli):
    for command in (["fit"], ["pretrain"], ["probe"], ["eval", "tokencut"]):
        code, out, _ = run_cli([*command, "--help"])
        assert code == 0 and "--threads" in out and "OpenMP" not in out, command


def test_the_demo_folder_is_ignored_by_git():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert "/soapvit-demo/" in (root / ".gitignore").read_text().splitlines()
