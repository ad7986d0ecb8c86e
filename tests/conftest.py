"""Shared test settings, the toy backbones and their fixtures.

``ToyBackbone``: patch embedding, a strong additive position embedding (a non-semantic signal SOAP
should find), one prefix token, residual blocks. ``ColourBackbone``: patch tokens are a fixed map of
the patch's mean colour, so objects of another colour than the background separate cleanly; any
grid size. This machine (and CI) has 2 cores shared by several jobs.
"""

import os

import pytest
import torch
from torch import nn

from soapvit.backbones.base import Backbone, RawOutput

torch.set_num_threads(1)  # OpenMP spin-waiting on a busy 2-core machine makes 2 threads slower


class ToyBackbone(Backbone):
    def __init__(self, dim: int = 16, patch: int = 4, blocks: int = 2, grid: int = 4, pos_scale: float = 3.0, seed: int = 0):
        super().__init__("toy:test", patch_size=patch, embed_dim=dim, num_blocks=blocks, num_heads=1,
                         num_prefix_tokens=1, image_size=patch * grid)
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Conv2d(3, dim, patch, patch)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(self.embed.weight.shape, generator=g) * 0.2)
            self.embed.bias.zero_()
        self.pos = nn.Parameter(torch.randn(grid * grid, dim, generator=g) * pos_scale)
        self.cls = nn.Parameter(torch.randn(1, 1, dim, generator=g))
        self.mix = nn.ParameterList([nn.Parameter(torch.randn(dim, dim, generator=g) / dim**0.5) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)

    def _run(self, pixels, blocks, norm, keys, attentions, edits):
        x = self.embed(pixels).flatten(2).transpose(1, 2) + self.pos[: (pixels.shape[-1] // self.patch_size) ** 2]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        hidden = {}
        for i, w in enumerate(self.mix):
            x = x + torch.tanh(x @ w)
            if i in edits:
                x = edits[i](x)
            if i in blocks:
                hidden[i] = self.norm(x) if i in norm else x
        return RawOutput(hidden=hidden, keys=x @ self.mix[-1] if keys else None)


class ColourBackbone(Backbone):
    """Patch tokens = a fixed random map of the patch's mean colour (plus a weak position term):
    objects of another colour than the background separate cleanly. Any grid size."""

    def __init__(self, dim: int = 12, patch: int = 4, seed: int = 0):
        super().__init__("toy:colour", patch_size=patch, embed_dim=dim, num_blocks=2, num_heads=1,
                         num_prefix_tokens=1, image_size=8 * patch)
        g = torch.Generator().manual_seed(seed)
        self.colour = nn.Parameter(torch.randn(3, dim, generator=g))
        self.key = nn.Parameter(torch.randn(dim, dim, generator=g) / dim**0.5)
        self.pos = nn.Parameter(torch.randn(2, dim, generator=g) * 0.05)

    def _run(self, pixels, blocks, norm, keys, attentions, edits):
        b, _, h, w = pixels.shape
        p = self.patch_size
        mean = nn.functional.avg_pool2d(pixels, p).flatten(2).transpose(1, 2)  # (B, N, 3)
        gy, gx = torch.meshgrid(torch.linspace(-1, 1, h // p), torch.linspace(-1, 1, w // p), indexing="ij")
        pos = torch.stack([gy, gx], -1).reshape(-1, 2) @ self.pos
        x = torch.tanh(mean @ self.colour) + pos
        x = torch.cat([x.mean(1, keepdim=True), x], 1)
        hidden = {blk: x for blk in blocks}
        return RawOutput(hidden=hidden, keys=x @ self.key if keys else None)


@pytest.fixture()
def test_device():
    """The device of the device-path tests: ``SOAPVIT_TEST_DEVICE`` (e.g. ``cuda``), else the CPU.
    A device that is not available skips those tests instead of failing them."""
    device = torch.device(os.environ.get("SOAPVIT_TEST_DEVICE", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"SOAPVIT_TEST_DEVICE={device}: CUDA is not available")
    return device


@pytest.fixture()
def toy_backbone():
    return ToyBackbone()


@pytest.fixture()
def colour_backbone():
    return ColourBackbone().eval()


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


def fit_soap(*args, **kwargs):
    """``soapvit.fitting.fit`` returning the SOAP head of the fitted corrections and the report."""
    from soapvit.fitting import fit

    corrections, report = fit(*args, **kwargs)
    return corrections.soap, report
