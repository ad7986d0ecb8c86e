"""The CLI contract: one-line errors, inspect's JSON."""

import json

import pytest
from PIL import Image
from toy_backbone import ToyBackbone

from soapvit.cli import main
from soapvit.fitting import fit


def run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_missing_and_empty_folders_and_bad_model_give_one_line(tmp_path, capsys):
    code, _, err = run(["fit", "--model", "zoo:dinov2-s14-imgfocus", "--images", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "h.safetensors")], capsys)
    assert code == 2 and "does not exist" in err and str(tmp_path / "nope") in err
    assert len(err.strip().splitlines()) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["fit", "--model", "zoo:x", "--images", str(empty), "--out", "h.safetensors"], capsys)
    assert code == 2 and "holds no images" in err and len(err.strip().splitlines()) == 1

    Image.new("RGB", (8, 8)).save(empty / "a.png")
    code, _, err = run(["fit", "--model", "nosuchsource:abc", "--images", str(empty), "--out", "h.safetensors"], capsys)
    assert code == 2 and "unknown model source 'nosuchsource'" in err and len(err.strip().splitlines()) == 1

    code, _, err = run(["inspect", str(tmp_path / "missing.safetensors")], capsys)
    assert code == 2 and "missing.safetensors" in err


def test_inspect_json_reports_every_block_in_eigenvalue_order(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.effect_noise((20, 20), 40 + 10 * i).convert("RGB").save(folder / f"{i}.png")
    head, _ = fit(ToyBackbone(blocks=3), folder, synthetic=6, device="cpu", blocks="all")
    path = head.save(tmp_path / "head.safetensors")
    code, out, _ = run(["inspect", str(path), "--json"], capsys)
    assert code in (0, None)
    data = json.loads(out)
    assert data["backbone"] == "toy:test"
    assert sorted(data["layers"], key=int) == ["0", "1", "2"]
    for b, layer in data["layers"].items():
        d = head.blocks[int(b)]
        assert layer["eigenvalues"] == pytest.approx(d.eigenvalues.tolist())
        assert layer["eigenvalues"] == sorted(layer["eigenvalues"], reverse=True)
        assert layer["si"] == pytest.approx(d.si.tolist()) and layer["weights"] == pytest.approx(d.weights.tolist())
    code, out, err = run(["inspect", str(path)], capsys)
    assert code in (0, None) and "block 2" in out
