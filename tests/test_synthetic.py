import numpy as np
import pytest
import scipy.fft
import torch

from soapvit.data.synthetic import (
    SyntheticImages,
    dct_matrix,
    linear_gradient,
    modulated_noise,
    pink_filter,
    pink_noise,
)
from soapvit.errors import SoapvitError


def test_dct_matrix_matches_scipy():
    x = np.random.default_rng(0).normal(size=(12, 12))
    c = dct_matrix(12, dtype=torch.float64).numpy()
    np.testing.assert_allclose(c @ x @ c.T, scipy.fft.dctn(x, type=2, norm="ortho"), atol=1e-12)


def test_pink_noise_has_unit_std_and_one_over_f_spectrum():
    g = torch.Generator().manual_seed(0)
    noise = pink_noise(64, 3, 32, g)
    std = noise.std(dim=(-2, -1))
    torch.testing.assert_close(std, torch.ones_like(std))
    # amplitude in the DCT domain falls as 1/f: compare mean |coefficient| in two frequency rings
    spec = np.abs(scipy.fft.dctn(noise.numpy(), axes=(-2, -1), norm="ortho")).mean((0, 1))
    f = 1 / pink_filter(32).numpy()
    low, high = (f > 3) & (f < 5), (f > 12) & (f < 20)
    ratio = spec[low].mean() / spec[high].mean()
    expected = (1 / f[low]).mean() / (1 / f[high]).mean()
    assert ratio == pytest.approx(expected, rel=0.1)


def test_gradient_and_modulated_noise_ranges():
    g = torch.Generator().manual_seed(1)
    grad = linear_gradient(8, 16, g)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    pixels = grad * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # a linear ramp before clipping: second differences vanish where nothing is clipped
    row = pixels[0, 0, 5]
    inside = (row > 1e-4) & (row < 1 - 1e-4)
    second = row[2:] - 2 * row[1:-1] + row[:-2]
    assert second[inside[1:-1] & inside[2:] & inside[:-2]].abs().max() < 1e-5
    mod = modulated_noise(4, 16, g)
    assert mod.shape == (4, 3, 16, 16) and torch.isfinite(mod).all()


@pytest.mark.parametrize("generator", ["mixture", "marginal", "pink", "modulated", "gradient"])
def test_streams_are_seeded_and_sized(generator):
    a = torch.cat(list(SyntheticImages(10, 16, generator, seed=5).batches(4)))
    b = torch.cat(list(SyntheticImages(10, 16, generator, seed=5).batches(4)))
    c = torch.cat(list(SyntheticImages(10, 16, generator, seed=6).batches(4)))
    assert a.shape == (10, 3, 16, 16)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_renormalisation_to_backbone_statistics():
    imagenet = torch.cat(list(SyntheticImages(3, 8, "gradient", 0).batches(3)))
    half = torch.cat(list(SyntheticImages(3, 8, "gradient", 0, mean=(0.5,) * 3, std=(0.5,) * 3).batches(3)))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(half * 0.5 + 0.5, imagenet * std + mean)


def test_bad_arguments():
    with pytest.raises(SoapvitError, match="--generator"):
        SyntheticImages(3, 8, "plaid")
    with pytest.raises(SoapvitError, match="--synthetic"):
        SyntheticImages(-1, 8)
