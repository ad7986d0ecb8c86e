"""Nothing a user types may crash a run: every bad option is one line on stderr with exit code 2,
checked before a model loads where it can be, and random option values never give a traceback."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from eval_helpers import saliency_folder
from PIL import Image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def fit_args(images, out, *extra):
    return ["fit", "--model", "zoo:mae", "--images", str(images), "--out", str(out), *extra]


BAD_FIT_OPTIONS = [
    (["--synthetic", "0"], "--synthetic"),
    (["--image-size", "0"], "--image-size"),
    (["--image-size", "-64"], "--image-size"),
    (["--image-size", "13"], "2x2 patches"),
    (["--limit", "0"], "--limit"),
    (["--limit", "-3"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "abc"], "--batch-size"),
    (["--weighting", "manual"], "--remove"),
    (["--remove", "1,x"], "--remove"),
    (["--remove", "0"], "--remove"),
    (["--layers", "99"], "out of range"),
    (["--blocks", "abc"], "--blocks"),
    (["--apply-layer", "99"], "out of range"),
    (["--generator", "clouds"], "--generator"),
    (["--variant", "x"], "--variant"),
    (["--tau", "-1"], "--tau"),
    (["--mu", "many"], "--mu"),
    (["--device", "mps"], "--device"),
    (["--block-features", "mlp"], "--block-features"),
    (["--final-norm", "some"], "--final-norm"),
]


@pytest.mark.parametrize("extra,needle", BAD_FIT_OPTIONS, ids=[" ".join(a) for a, _ in BAD_FIT_OPTIONS])
def test_bad_fit_options_are_one_line_errors(run_cli, images, tmp_path, extra, needle):
    code, _, err = run_cli(fit_args(images, tmp_path / "h.safetensors", *extra))
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "h.safetensors").exists()


def test_unwritable_out_fails_before_any_compute(run_cli, images, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(fit_args(images, blocker / "h.safetensors"))
    assert code == 2 and "--out" in err and "writable" in err


def test_square_brackets_in_user_text_survive_the_printer(run_cli, tmp_path):
    code, _, err = run_cli(["fit", "--model", "zoo:mae", "--images", str(tmp_path / "data[v2]" / "[/y]"),
                            "--out", str(tmp_path / "h.safetensors")])
    assert code == 2 and "data[v2]/[/y]" in err


def test_eval_options_are_checked_before_the_model_loads(run_cli, tmp_path):
    common = ["eval", "tokencut", "--model", "hub-is-not-reachable:x", "--images", str(tmp_path)]
    for extra, needle in ((["--tau", "-3"], "--tau"), (["--tau", "1.5"], "--tau"), (["--resize", "round"], "--resize"),
                          (["--resample", "magic"], "--resample"), (["--batch-size", "0"], "--batch-size")):
        code, _, err = run_cli(common + extra)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (extra, err)
    code, _, err = run_cli(["eval", "knnseg", "--model", "x:y", "--train", str(tmp_path), "--val", str(tmp_path),
                            "--k", "0"])
    assert code == 2 and "--k" in err


def test_a_head_refuses_another_backbone_unless_allowed(run_cli, images, tmp_path):
    head = tmp_path / "mae.safetensors"
    assert run_cli(fit_args(images, head, "--synthetic", "4", "--blocks", "last"))[0] in (0, None)
    from soapvit.backbones import load
    from soapvit.corrections import CorrectionSet

    fitted = CorrectionSet.load(head)
    fitted.check_backbone(load("zoo:mae"))
    with pytest.raises(Exception, match="fitted for zoo:mae, not zoo:dino"):
        fitted.check_backbone(load("zoo:dino"))
    fitted.check_backbone(load("zoo:dino"), allow_other=True)


def test_allow_other_backbone_works_for_a_head_at_an_earlier_block(run_cli, images, tmp_path):
    head = tmp_path / "mae.safetensors"
    assert run_cli(fit_args(images, head, "--synthetic", "4", "--blocks", "all", "--apply-block", "2"))[0] in (0, None)
    saliency = saliency_folder(tmp_path / "sal", n=3)
    args = ["eval", "tokencut", "--model", "zoo:maskfeat", "--images", str(saliency / "images"), "--head", str(head),
            "--out", str(tmp_path / "r.json")]
    code, _, err = run_cli(args)
    assert code == 2 and "fitted for zoo:mae, not zoo:maskfeat" in err
    code, _, err = run_cli([*args, "--allow-other-backbone"])
    assert code in (0, None), err
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["passes"]["soap"] == "own pass" and set(payload["intervals"]) == {"soap", "posmean"}


def test_final_norm_all_changes_only_the_earlier_blocks_and_is_recorded(run_cli, images, tmp_path):
    import torch

    from soapvit.corrections import CorrectionSet

    heads = {}
    for choice in ("last", "all"):
        path = tmp_path / f"{choice}.safetensors"
        assert run_cli(fit_args(images, path, "--synthetic", "4", "--blocks", "all", "--final-norm", choice))[0] in (0, None)
        heads[choice] = CorrectionSet.load(path)
    assert heads["last"].metadata["norm"] == "last" and heads["all"].metadata["norm"] is True
    edited, normed = heads["last"].soap, heads["all"].soap
    last = edited.apply_block
    torch.testing.assert_close(edited.blocks[last].eigenvalues, normed.blocks[last].eigenvalues)
    # the raw residual stream of block 0 is not the final-norm one (LayerNorm rescales every token)
    assert not torch.allclose(edited.blocks[0].eigenvalues, normed.blocks[0].eigenvalues)


def test_a_branch_head_is_refused_for_applying(run_cli, images, tmp_path):
    head = tmp_path / "branch.safetensors"
    assert run_cli(fit_args(images, head, "--synthetic", "4", "--blocks", "last", "--block-features", "branch"))[0] in (0, None)
    saliency = saliency_folder(tmp_path / "sal", n=3)
    code, _, err = run_cli(["eval", "tokencut", "--model", "zoo:mae", "--images", str(saliency / "images"),
                            "--head", str(head)])
    assert code == 2 and "block-features branch" in err and "diagnosis, not for applying" in err
    assert len(err.strip().splitlines()) == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.one_of(st.none(), st.integers(-3, 6)),
    synthetic=st.one_of(st.none(), st.integers(-2, 5)),
    image_size=st.one_of(st.none(), st.sampled_from([-8, 0, 8, 15, 16, 24, 33])),
    batch_size=st.sampled_from(["-1", "0", "1", "3", "x"]),
    blocks=st.sampled_from(["all", "last", "0,2", "-1", "7", "a", ""]),
    tau=st.sampled_from(["0.05", "0", "-1", "nan", "x"]),
    remove=st.sampled_from(["", "1", "2,3", "0", "99", "1,x"]),
)
def test_random_fit_options_never_give_a_traceback(run_cli, images, tmp_path, limit, synthetic, image_size,
                                                   batch_size, blocks, tau, remove):
    extra = ["--batch-size", batch_size, "--blocks", blocks, "--tau", tau, "--remove", remove]
    for name, value in (("--limit", limit), ("--synthetic", synthetic), ("--image-size", image_size)):
        if value is not None:
            extra += [name, str(value)]
    code, _, err = run_cli(fit_args(images, tmp_path / "h.safetensors", *extra))
    assert code in (0, None, 2), err
    assert "Traceback" not in err and "bug" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err


def test_remove_numbers_components_as_inspect_prints_them(run_cli, images, tmp_path):
    head = tmp_path / "manual.safetensors"
    code, _, err = run_cli(fit_args(images, head, "--synthetic", "4", "--blocks", "last", "--remove", "3,5"))
    assert code in (0, None), err
    code, out, _ = run_cli(["inspect", str(head), "--json"])
    weights = json.loads(out)["blocks"]["5"]["weights"]
    assert [c + 1 for c, w in enumerate(weights) if w > 0] == [3, 5]  # PC3 and PC5, numbered from 1
    code, out, _ = run_cli(["inspect", str(head)])
    assert "PC3 " in out and "(w 1.00)" in out.split("PC3 ", 1)[1].split("PC4", 1)[0]
