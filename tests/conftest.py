"""Shared test settings and fixtures: this machine (and CI) has 2 cores shared by several jobs."""

import pytest
import torch

torch.set_num_threads(1)  # OpenMP spin-waiting on a busy 2-core machine makes 2 threads slower


@pytest.fixture()
def run_cli(capsys):
    """Run the ``soapvit`` CLI in-process: ``run_cli(args) -> (exit code, stdout, stderr)``."""
    from soapvit.cli import main

    def run(args):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


def write_noise_images(folder, n=6, size=(16, 16)):
    """``n`` RGB noise images of ``size`` (different noise levels) in a new ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.effect_noise(size, 30 + 10 * i).convert("RGB").save(folder / f"{i}.png")
    return folder
