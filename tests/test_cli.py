"""The CLI contract: one-line errors, inspect's JSON."""

import json

import pytest
from PIL import Image
from conftest import ToyBackbone

from conftest import fit_soap


def test_missing_and_empty_folders_and_bad_model_give_one_line(tmp_path, run_cli):
    code, _, err = run_cli(["fit", "--model", "zoo:dinov2-s14-imgfocus", "--images", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "h.safetensors")])
    assert code == 2 and "does not exist" in err and str(tmp_path / "nope") in err
    assert len(err.strip().splitlines()) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["fit", "--model", "zoo:x", "--images", str(empty), "--out", "h.safetensors"])
    assert code == 2 and "holds no images" in err and len(err.strip().splitlines()) == 1

    Image.new("RGB", (8, 8)).save(empty / "a.png")
    code, _, err = run_cli(["fit", "--model", "nosuchsource:abc", "--images", str(empty), "--out", "h.safetensors"])
    assert code == 2 and "unknown model source 'nosuchsource'" in err and len(err.strip().splitlines()) == 1

    code, _, err = run_cli(["inspect", str(tmp_path / "missing.safetensors")])
    assert code == 2 and "missing.safetensors" in err


def test_inspect_json_reports_every_block_in_eigenvalue_order(tmp_path, run_cli):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.effect_noise((20, 20), 40 + 10 * i).convert("RGB").save(folder / f"{i}.png")
    head, _ = fit_soap(ToyBackbone(blocks=3), folder, synthetic=6, device="cpu", blocks="all")
    path = head.save(tmp_path / "head.safetensors")
    code, out, _ = run_cli(["inspect", str(path), "--json"])
    assert code in (0, None)
    data = json.loads(out)
    assert data["backbone"] == "toy:test"
    assert sorted(data["blocks"], key=int) == ["0", "1", "2"]
    for b, layer in data["blocks"].items():
        d = head.blocks[int(b)]
        assert layer["eigenvalues"] == pytest.approx(d.eigenvalues.tolist())
        assert layer["eigenvalues"] == sorted(layer["eigenvalues"], reverse=True)
        assert layer["si"] == pytest.approx(d.si.tolist()) and layer["weights"] == pytest.approx(d.weights.tolist())
    code, out, err = run_cli(["inspect", str(path)])
    assert code in (0, None) and "block 2" in out


def test_fit_inspect_plot_end_to_end_on_a_tiny_hf_model(tmp_path, run_cli):
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                             patch_size=8)).save_pretrained(model_dir)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(5):
        Image.effect_noise((40, 30), 30 + 10 * i).convert("RGB").save(images / f"{i}.jpg")
    (images / "broken.png").write_bytes(b"nope")
    head = tmp_path / "head.safetensors"
    code, _, err = run_cli(["fit", "--model", f"hf:{model_dir}", "--images", str(images), "--synthetic", "4",
                        "--layers", "all", "--image-size", "32", "--batch-size", "2", "--device", "cpu",
                        "--out", str(head)])
    assert code in (0, None), err
    assert "skipped 1 input" in err and "broken.png" in err
    code, out, _ = run_cli(["inspect", str(head), "--json"])
    data = json.loads(out)
    assert data["backbone"] == f"hf:{model_dir}" and sorted(data["blocks"]) == ["0", "1"]
    assert all(len(layer["si"]) == 32 for layer in data["blocks"].values())
    code, _, err = run_cli(["plot", str(head), str(head), "--out", str(tmp_path / "figs"), "--images", str(images),
                        "--count", "2"])
    assert code in (0, None), err
    written = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert written == ["max_si_per_block.png", "max_si_per_block_compare.png", "response_maps.png",
                       "si_sorted.png", "si_sorted_compare.png", "token_maps.png"]


def test_list_images_recursive_for_class_folders(tmp_path):
    from soapvit.data.images import list_images

    for cls in ("n01", "n02"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (4, 4)).save(tmp_path / cls / f"{i}.JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)] == [
        "n01/0.JPEG", "n01/1.JPEG", "n02/0.JPEG", "n02/1.JPEG"]
    assert [p.name for p in list_images(tmp_path, 3, recursive=True)] == ["0.JPEG", "1.JPEG", "0.JPEG"]


def test_inspect_flags_components_removed_below_the_si_threshold(run_cli, tmp_path):
    import torch
    from eval_helpers import make_head

    head = make_head(torch.diag(torch.tensor([0.0, 1.0, 1.0])), apply_block=0)
    head.blocks[0].si = torch.tensor([0.71, 0.2, 0.1], dtype=torch.float64)  # PC1 removed at chance-level SI
    code, out, err = run_cli(["inspect", str(head.save(tmp_path / "h.safetensors"))])
    assert code in (0, None), err
    assert "PC1:1.00*" in out and "removed with SI below 0.75" in out
    head.blocks[0].si = torch.tensor([0.9, 0.2, 0.1], dtype=torch.float64)
    code, out, _ = run_cli(["inspect", str(head.save(tmp_path / "h2.safetensors"))])
    assert "PC1:1.00" in out and "PC1:1.00*" not in out and "removed with SI below" not in out
