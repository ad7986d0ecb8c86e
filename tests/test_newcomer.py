"""What a newcomer meets in the first hour: pretrain's help in the words of the other commands,
warnings and skipped files in one order however the work was scheduled, evaluation tables that
name model, head and metrics, token maps that show a removed component as removed, and the
LayerNorm null direction marked as such in SI curves, the report and ``inspect``."""

import itertools
import json
import random
import warnings

import numpy as np
import pytest
import torch
from conftest import ColourBackbone, ToyBackbone, fit_soap, write_noise_images
from eval_helpers import make_head, saliency_folder
from PIL import Image
from test_report import parse

from soapvit.backbones.registry import register_source
from soapvit.corrections.soap import without_degenerate
from soapvit.data.sources import ImageFiles
from soapvit.data.transforms import ImageTransform
from soapvit.features import iter_tokens
from soapvit.report import render_report
from soapvit.runlog import RunLog

NULL_DIRECTION = "LayerNorm null direction"


def _commands(command, path=()):
    """``(path, command)`` of every leaf command of the CLI."""
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, command


def _options(command) -> dict[str, str]:
    return {p.opts[0]: p.help or "" for p in command.params if p.param_type_name == "option" and p.name != "help"}


# -- 1. pretrain --help ---------------------------------------------------------------------------
def test_pretrain_help_uses_the_words_of_the_other_commands(run_cli):
    import typer.main

    from soapvit.cli import app
    from soapvit.pretrain import OBJECTIVES

    commands = dict(_commands(typer.main.get_command(app)))
    options = {path: _options(c) for path, c in commands.items()}
    # every option of every command says what it is, as a sentence
    missing = [(" ".join(p), o) for p, opts in options.items() for o, h in opts.items() if not h.strip().endswith(".")]
    assert missing == []
    pretrain, fit, tokencut = options[("pretrain",)], options[("fit",)], options[("eval", "tokencut")]
    # the options pretrain shares with the other commands are spelled the same
    assert pretrain["--device"] == fit["--device"] == tokencut["--device"]
    assert pretrain["--threads"] == fit["--threads"]
    # choices listed as the other commands list them ("a, b or c"), each objective named once
    objective = pretrain["--objective"]
    assert "|" not in objective and objective.startswith("Training objective: ")
    assert all(objective.count(name) == 1 for name in OBJECTIVES if name != "dino") and " or ibot" in objective
    # sentences start with a capital unless they start with a choice (as fit's --device does)
    assert [o for o, h in pretrain.items() if h[0].islower() and h != fit["--device"]] == []

    code, out, _ = run_cli(["pretrain", "--help"])
    assert code == 0
    for shown in ("[default: 64]", "[default: 96]", "[default: train]", "Images per training step.",
                  "Number of transformer blocks.", "<float>", "<path>"):
        assert shown in out, shown


# -- 2. one order for a run's log ----------------------------------------------------------------
SKIPS = [("imgs/b/10.png", "cannot decode"), ("imgs/a.png", "empty file"), ("imgs/b/2.png", "cannot decode"),
         ("imgs/a/z.png", "truncated"), ("imgs/b/2.png", "cannot decode")]
WARNINGS = ["image imgs/c.png is 9000x9000", "--methods all: blank left out", "image imgs/a.png is 9000x9000",
            "--methods all: blank left out"]


def test_a_log_has_one_order_whatever_order_it_was_recorded_in():
    logs = []
    for seed in range(6):
        rng = random.Random(seed)
        skips, notes = rng.sample(SKIPS, len(SKIPS)), rng.sample(WARNINGS, len(WARNINGS))
        log = RunLog()
        for (name, reason), note in itertools.zip_longest(skips, notes, fillvalue=(None, None)):
            if name is not None:
                log.skip(name, reason)
            if isinstance(note, str):
                log.warn(note)
        logs.append(log.to_dict())
    assert all(log == logs[0] for log in logs)
    # path order, folder by folder (as a folder source lists them), each entry once
    assert [e["file"] for e in logs[0]["skipped"]] == ["imgs/a/z.png", "imgs/a.png", "imgs/b/10.png", "imgs/b/2.png"]
    assert logs[0]["warnings"] == sorted(set(WARNINGS))
    # the log of a resumed run (read back from its state) and a merge of per-rank logs agree
    shuffled = {"skipped": [{"file": f, "reason": r} for f, r in reversed(SKIPS)], "warnings": WARNINGS[::-1]}
    assert RunLog(**shuffled).to_dict() == logs[0]
    ranks = [RunLog(), RunLog()]
    for i, (name, reason) in enumerate(SKIPS):
        ranks[i % 2].skip(name, reason)
    for i, note in enumerate(WARNINGS):
        ranks[1 - i % 2].warn(note)
    for order in (ranks, ranks[::-1]):
        merged = _merged(order)
        assert merged.to_dict() == logs[0]


def _merged(logs):
    """The logs of several ranks recorded into one, as :func:`soapvit.features.gather_log` does."""
    merged = RunLog()
    for part in logs:
        for entry in part.skipped:
            merged.skip(entry["file"], entry["reason"])
        for message in part.warnings:
            merged.warn(message)
    return merged


class WarningFiles(ImageFiles):
    """Image files whose reader warns about each file it loads."""

    def load(self, index):
        warnings.warn(f"odd header in {self.name(index)}", stacklevel=2)
        return super().load(index)


def _pipeline_log(files, indices, workers):
    log = RunLog()
    backbone = ColourBackbone()
    transform = ImageTransform.for_backbone(backbone, mode="aspect")
    for _ in iter_tokens(backbone, WarningFiles(files), transform, indices=indices, batch_size=2,
                         num_workers=workers, log=log):
        pass
    return log


def test_the_pipeline_log_is_the_same_for_any_split_of_the_work(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = []
    # batches group items by input size, so the loader reads them out of file order
    for i, size in enumerate([(20, 12), (16, 16), (12, 20), (16, 16), (20, 12), (16, 16)]):
        files.append(folder / f"{i}.png")
        Image.fromarray(np.full((size[1], size[0], 3), 30 * i, np.uint8)).save(files[-1])
    (folder / "broken.png").write_bytes(b"\x89PNG not a png")
    (folder / "cut.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    files[2:2] = [folder / "cut.jpg"]
    files[5:5] = [folder / "broken.png"]
    one = _pipeline_log(files, range(len(files)), 0)
    assert [e["file"] for e in one.skipped] == [str(folder / "broken.png"), str(folder / "cut.jpg")]
    assert one.warnings == [f"odd header in {folder / f'{i}.png'}" for i in range(6)]
    # two loader workers, and two "ranks" each encoding every other item, merged in either order
    assert _pipeline_log(files, range(len(files)), 2).to_dict() == one.to_dict()
    halves = [_pipeline_log(files, range(r, len(files), 2), 0) for r in (1, 0)]
    for order in (halves, halves[::-1]):
        merged = _merged(order)
        assert merged.to_dict() == one.to_dict()


def test_the_cli_prints_a_log_in_its_order(capsys):
    from soapvit.cli.common import print_log

    class Result:
        log = RunLog()

    for note in ("zeta warning", "alpha warning", "mid warning"):
        Result.log.warn(note)
    for name in ("c.png", "a.png", "b.png"):
        Result.log.skip(name, "cannot decode")
    Result.warnings = Result.log.warnings
    print_log(Result)
    err = capsys.readouterr().err
    positions = [err.index(text) for text in ("alpha", "mid", "zeta", "a.png", "b.png", "c.png")]
    assert positions == sorted(positions)


# -- heads and tokens of the toy backbone (final LayerNorm, strong position embedding) -------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("newcomer")
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(images / f"img{i:02d}.png")
    backbone = ToyBackbone(pos_scale=3.0)
    head = fit_soap(backbone, images, synthetic=12, batch_size=6, device="cpu", blocks="all")[0]
    return backbone, head, sorted(images.glob("*.png")), folder


def _tokens(backbone, head, files):
    transform = ImageTransform.for_backbone(backbone, size=backbone.image_size)
    before, after, shown = [], [], []
    for batch in iter_tokens(backbone, ImageFiles(files), transform, blocks=head.apply_block,
                             corrections={"soap": head}, keep_images=True):
        shown += [np.asarray(image.resize((16, 16))) for image in batch.images]
        before.append(batch.original.tokens[head.apply_block])
        after.append(batch.variants["soap"].tokens[head.apply_block])
    return shown, torch.cat(before).numpy(), torch.cat(after).numpy()


# -- 3. evaluation tables name model, head and metrics ---------------------------------------------
def test_report_tables_of_json_written_by_eval_name_model_head_and_metrics(toy, tmp_path):
    from soapvit.cli import main

    register_source("toy")(lambda name: ColourBackbone() if name == "colour" else ToyBackbone())
    folder = saliency_folder(tmp_path / "ecssd")
    colour_head = make_head(torch.diag(torch.tensor([1.0] * 6 + [0.0] * 6))).save(tmp_path / "colour.safetensors")
    toy_head = toy[1].save(tmp_path / "toy-head.safetensors")
    runs = {"tokencut.json": ["eval", "tokencut", "--model", "toy:colour", "--images", str(folder / "images"),
                              "--masks", str(folder / "masks"), "--head", str(colour_head), "--tau", "0.2"],
            "warp.json": ["eval", "warp", "--model", "toy:test", "--images", str(write_noise_images(tmp_path / "n")),
                          "--warps", "flip,crop", "--head", str(toy_head)],
            "plain.json": ["eval", "warp", "--model", "toy:test", "--images", str(tmp_path / "n"), "--warps", "flip"]}
    for name, args in runs.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--out", str(tmp_path / name)])
        assert exit_info.value.code == 0, name
    page = render_report({"toy:test": toy[1]}, [tmp_path / n for n in runs])
    tables = {t["caption"]: t["rows"] for t in parse(page).tables}
    tokencut = json.loads((tmp_path / "tokencut.json").read_text())
    rows = tables["TokenCut (soap protocol) — model toy:colour, head colour.safetensors — tokencut.json"]
    assert rows[0] == ["variant", "max Fβ", "IoU", "pixel accuracy", "images", "CorLoc"]
    assert rows[1][:2] == ["original", f"{tokencut['results']['original']['maxFbeta']:.3f}"]
    warp = tables["warp consistency — model toy:test, head toy-head.safetensors — warp.json"]
    assert warp[0] == ["variant", "PCK@0.05", "PCK@0.1", "same-position rate", "images", "patches"]
    assert [r[0] for r in warp[1:]] == ["original", "soap", "posmean"]  # every correction of the file
    assert "warp consistency — model toy:test, no head (original tokens only) — plain.json" in tables
    assert "maxFbeta" not in "".join(map(str, tables.values())) and "same_position" not in page


# -- 4. token maps: a removed component is flat at 0 after the head ---------------------------------
def test_after_panels_are_centred_so_a_removed_component_is_flat_at_zero(toy):
    from soapvit.plots import token_maps_figure

    backbone, head, files, _ = toy
    images, before, after = _tokens(backbone, head, files[:2])
    d = head.blocks[head.apply_block]
    comps = torch.argsort(d.si, descending=True)[:2].tolist()
    assert d.weights[comps[0]] > 0.9, "the toy head should remove its top-SI component"
    fig = token_maps_figure(images, before, after, head, count=2)  # 7 panels per image, row by row
    for image in range(2):
        for c in comps:
            was = fig.axes[image * 7 + 3 + 2 * comps.index(c)].images[0]
            now = fig.axes[image * 7 + 4 + 2 * comps.index(c)].images[0]
            z = (before[image] - d.mean.numpy()) @ d.eigenvectors.numpy()[:, c]
            lim = np.abs(z).max()
            np.testing.assert_allclose(was.get_array(), z, rtol=1e-6)
            # one diverging scale centred on 0 for both panels, the before map's symmetric limits
            assert was.get_clim() == now.get_clim() == pytest.approx((-lim, lim))
            assert was.get_cmap().name == now.get_cmap().name == "coolwarm"
            # after = (1 − w) × before: the head's own image of the mean is taken off
            w = float(d.weights[c])
            np.testing.assert_allclose(now.get_array(), (1 - w) * z, atol=1e-5 * lim)
            assert z.std() > 0.2 * lim  # the before panel shows structure
            if w > 0.9:
                assert np.abs(now.get_array()).max() < 0.1 * lim  # removed: flat at the neutral colour
    assert [ax.get_title() for ax in fig.axes[:7]] == ["image", "PCA before", "PCA after",
                                                       f"PC{comps[0] + 1} before", f"PC{comps[0] + 1} after",
                                                       f"PC{comps[1] + 1} before", f"PC{comps[1] + 1} after"]


# -- 5. the LayerNorm null direction ---------------------------------------------------------------
def test_the_null_direction_is_what_the_fit_pins_and_curves_mark_it_apart(toy):
    from soapvit import plots
    from soapvit.plots import null_components, si_curves_figure
    from soapvit.report import si_small_multiples_figure

    assert plots.NULL_DIRECTION == NULL_DIRECTION
    _, head, _, _ = toy
    d = head.blocks[head.apply_block]
    dim = len(d.si)
    assert null_components(d) == [dim - 1]  # the last by eigenvalue: no variance behind the LayerNorm
    assert float(d.eigenvalues[-1]) <= 1e-9 * float(d.eigenvalues[0]) < float(d.eigenvalues[-2])
    assert without_degenerate(torch.ones(dim, dtype=torch.float64), d.eigenvalues)[dim - 1] < 1
    fig = si_curves_figure({"toy": head})
    ax_all, ax_top = fig.axes
    curve, cross = ax_all.lines[:2]
    kept = np.sort(d.si.numpy()[:-1])[::-1]
    np.testing.assert_allclose(curve.get_ydata(), kept)  # the line ends at the last real component: no cliff
    assert list(curve.get_xdata()) == list(range(1, dim)) and min(curve.get_ydata()) > 1e-3
    assert list(cross.get_xdata()) == [dim] and list(cross.get_ydata()) == [0]
    assert cross.get_marker() == "x" and cross.get_linestyle() == "None"
    assert NULL_DIRECTION in cross.get_label()
    assert [t.get_text() for t in ax_all.get_legend().get_texts()] == ["toy", cross.get_label()]
    assert len(ax_top.lines[0].get_ydata()) == 10 and np.all(ax_top.lines[0].get_ydata() == kept[:10])
    # the report's small multiples: the cross where a block has a null direction, the full line where not
    small = si_small_multiples_figure(head)
    blocks = sorted(head.blocks)
    assert [null_components(head.blocks[b]) for b in blocks] == [[], [dim - 1]]  # block 0: tokens before the norm
    for ax, b in zip(small.axes, blocks):
        null = null_components(head.blocks[b])
        assert len(ax.lines[0].get_ydata()) == dim - len(null)
        crosses = [line for line in ax.lines if line.get_marker() == "x"]
        assert [list(c.get_xdata()) for c in crosses] == ([[dim]] if null else [])
    assert [t.get_text() for t in small.legends[0].get_texts()] == [f"{NULL_DIRECTION} (no variance: SI undefined)"]


def test_inspect_labels_the_null_direction(toy, run_cli):
    _, head, _, folder = toy
    code, out, err = run_cli(["inspect", str(head.save(folder / "inspect.safetensors"))])
    assert code in (0, None), err
    dim = len(head.blocks[head.apply_block].si)
    label = f"PC{dim} – ({NULL_DIRECTION}: no variance, SI undefined)"
    lines = {b: next(x for x in out.splitlines() if x.startswith(f"block {b} SI")) for b in sorted(head.blocks)}
    assert label in lines[1] and f"PC{dim - 1} {head.blocks[1].si[dim - 2]:.2f}" in lines[1]
    assert f"PC{dim} {head.blocks[0].si[dim - 1]:.2f}" in lines[0] and NULL_DIRECTION not in lines[0]
