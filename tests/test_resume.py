"""Resumable fits: kill -9 mid-fit, rerun the same command, get the uninterrupted head."""

import json
import os
import subprocess
import sys
import time

import pytest
from test_distributed import ASSETS, assert_same_head
from conftest import ToyBackbone

from soapvit.errors import SoapvitError
from conftest import fit_soap
from soapvit.safetensors_io import read_safetensors
from soapvit.corrections.soap import SoapHead

# the CLI with every forward pass slowed down, so that a kill lands mid-fit
SLOW_CLI = """
import sys, time
import soapvit.features as features, soapvit.fitting as fitting
fast = features.encode
def encode(*args, **kwargs):
    time.sleep(0.25)
    return fast(*args, **kwargs)
features.encode = fitting.encode = encode
from soapvit.cli import main
main(sys.argv[1:])
"""


def checkpoint_position(folder):
    path = folder / "rank-0-of-1.safetensors"
    if not path.is_file():
        return None
    return json.loads(read_safetensors(path, "checkpoint")[1]["soapvit"])["position"]


def run_until(args, folder, reached):
    """Start the slowed CLI, SIGKILL it as soon as its checkpoint satisfies ``reached``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        position = checkpoint_position(folder)
        if position is not None and reached(position):
            process.kill()
            process.wait()
            return position
        time.sleep(0.05)
    raise AssertionError(f"the fit ended before it was killed: {process.communicate()[1][-2000:]}")


def test_sigkill_in_each_pass_then_rerun_gives_the_uninterrupted_head(tmp_path, run_cli):
    folder = tmp_path / "state"
    common = ["fit", "--model", "zoo:mae", "--images", ASSETS, "--limit", "8", "--synthetic", "6", "--batch-size", "2",
              "--blocks", "all", "--device", "cpu"]
    code, _, err = run_cli([*common, "--out", str(tmp_path / "uninterrupted.safetensors")])
    assert code in (0, None), err
    resumable = [*common, "--out", str(tmp_path / "resumed.safetensors"), "--checkpoint", str(folder),
                 "--checkpoint-every", "1"]
    killed = run_until(resumable, folder, lambda p: p["stage"] == "moments" and p["real_steps"] >= 2)
    assert killed["n_real"] == 2 * killed["real_steps"] < 8
    killed = run_until(resumable, folder, lambda p: p["stage"] == "responses" and p["synthetic_steps"] >= 1)
    assert killed["n_real"] == 8 and killed["real_steps"] == 4
    code, _, err = run_cli(resumable)
    assert code in (0, None), err
    assert_same_head(SoapHead.load(tmp_path / "uninterrupted.safetensors"),
                     SoapHead.load(tmp_path / "resumed.safetensors"), atol=1e-12)


def test_a_checkpoint_of_another_fit_is_refused(tmp_path, images_folder):
    options = dict(synthetic=4, batch_size=2, device="cpu", checkpoint=tmp_path / "state", checkpoint_every=1)
    first, _ = fit_soap(ToyBackbone(), images_folder, **options)
    again, _ = fit_soap(ToyBackbone(), images_folder, **options)  # a finished state: nothing left to encode
    assert_same_head(first, again, atol=0)
    with pytest.raises(SoapvitError, match="holds another fit \\(its seed differ\\)"):
        fit_soap(ToyBackbone(), images_folder, seed=1, **options)
    (tmp_path / "state" / "rank-0-of-1.safetensors").rename(tmp_path / "state" / "rank-0-of-2.safetensors")
    with pytest.raises(SoapvitError, match="another number of processes"):
        fit_soap(ToyBackbone(), images_folder, **options)


@pytest.fixture()
def images_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.effect_noise((16, 16), 30 + 10 * i).convert("RGB").save(folder / f"{i}.png")
    return folder
