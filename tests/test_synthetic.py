import numpy as np
import pytest
import scipy.fft
import scipy.stats
import torch

from soapvit.data.synthetic import (
    GENERATOR_VERSION,
    SyntheticImages,
    dct_matrix,
    linear_gradient,
    mixture,
    mixture_weights,
    modulated_noise,
    pink_envelope,
    pink_filter,
    pink_noise,
)
from soapvit.errors import SoapvitError

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_dct_matrix_matches_scipy():
    x = np.random.default_rng(0).normal(size=(12, 12))
    c = dct_matrix(12, dtype=torch.float64).numpy()
    np.testing.assert_allclose(c @ x @ c.T, scipy.fft.dctn(x, type=2, norm="ortho"), atol=1e-12)


def test_pink_noise_has_unit_std_and_one_over_f_spectrum():
    noise = pink_noise(64, 3, 32, _seeded(0))
    std = noise.std(dim=(-2, -1))
    torch.testing.assert_close(std, torch.ones_like(std))
    # amplitude in the DCT domain falls as 1/f: compare mean |coefficient| in two frequency rings
    spec = np.abs(scipy.fft.dctn(noise.numpy(), axes=(-2, -1), norm="ortho")).mean((0, 1))
    f = 1 / pink_filter(32).numpy()
    low, high = (f > 3) & (f < 5), (f > 12) & (f < 20)
    ratio = spec[low].mean() / spec[high].mean()
    expected = (1 / f[low]).mean() / (1 / f[high]).mean()
    assert ratio == pytest.approx(expected, rel=0.1)


def test_pink_envelope_is_the_unit_std_pink_field_in_imagenet_pixel_range():
    envelope = pink_envelope(16, 32, _seeded(2)).numpy().astype(np.float64)
    field = pink_noise(16, 1, 32, _seeded(2)).numpy().astype(np.float64)  # same draws, std 1
    np.testing.assert_allclose(envelope, np.clip(field * STD[:, None, None] + MEAN[:, None, None], 0, 1), atol=1e-6)
    clipped = ((envelope == 0) | (envelope == 1)).mean()
    assert 0 < clipped < 0.1  # only the tails beyond about two standard deviations
    np.testing.assert_allclose(field.std(axis=(-2, -1), ddof=1), 1.0, atol=1e-4)


def test_modulated_noise_amplitude_at_224_px():
    """The authors' generator: envelope mean ≈ 0.47 and product std ≈ 0.53 (red channel; the reference
    below gives 0.486 / 0.534 for it, 0.451 / 0.502 averaged over channels)."""
    envelope = torch.cat([pink_envelope(32, 224, _seeded(s)) for s in range(4)])
    product = torch.cat([modulated_noise(32, 224, _seeded(10 + s)) for s in range(4)])
    x = np.random.default_rng(0).normal(size=1_000_000)
    reference = np.clip(MEAN[:, None] + STD[:, None] * x, 0, 1)
    np.testing.assert_allclose(envelope.mean(dim=(0, 2, 3)).numpy(), reference.mean(axis=1), atol=0.02)
    np.testing.assert_allclose(product.std(dim=(0, 2, 3)).numpy(), np.sqrt((reference**2).mean(axis=1)), atol=0.03)
    assert envelope[:, 0].mean().item() == pytest.approx(0.47, abs=0.02)
    assert product[:, 0].std().item() == pytest.approx(0.53, abs=0.03)
    assert product.mean().abs().item() < 0.01


def test_gradient_is_a_clipped_linear_ramp_in_pixel_range():
    grad = linear_gradient(8, 16, _seeded(1))
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    pixels = grad * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # a linear ramp before clipping: second differences vanish where nothing is clipped
    row = pixels[0, 0, 5]
    inside = (row > 1e-4) & (row < 1 - 1e-4)
    second = row[2:] - 2 * row[1:-1] + row[:-2]
    assert second[inside[1:-1] & inside[2:] & inside[:-2]].abs().max() < 1e-5


def test_mixture_weights_follow_dirichlet_1_1_2():
    weights = mixture_weights(4000, _seeded(3)).numpy().astype(np.float64)
    assert (weights > 0).all()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    # marginals of Dirichlet(1, 1, 2): Beta(1, 3), Beta(1, 3), Beta(2, 2)
    for column, (a, b) in enumerate([(1, 3), (1, 3), (2, 2)]):
        assert scipy.stats.kstest(weights[:, column], scipy.stats.beta(a, b).cdf).pvalue > 0.01


def _np_pink(white: np.ndarray) -> np.ndarray:
    """METHODS.md: white noise → 2-D DCT → × 1/f (f = radial frequency index, f(0,0) := 1) →
    inverse DCT → divided by each sample's per-channel std (ddof 1, as torch.std)."""
    size = white.shape[-1]
    u = np.arange(size)
    f = np.hypot(u[:, None], u[None, :])
    f[0, 0] = 1.0
    field = scipy.fft.idctn(scipy.fft.dctn(white, axes=(-2, -1), norm="ortho") / f, axes=(-2, -1), norm="ortho")
    return field / field.std(axis=(-2, -1), ddof=1, keepdims=True)


def _np_mixture(n: int, size: int, seed: int) -> np.ndarray:
    """An independent float64 numpy implementation of the mixture generator from METHODS.md's
    description, fed with the generator's random draws in the order it takes them: 4 uniforms
    (Dirichlet(1, 1, 2) as sums of Exp(1) draws), white noise of the pink image, white noise of
    the envelope's pink field, the modulated white noise, the 9 gradient coefficients."""
    g = _seeded(seed)
    uniform = torch.rand(n, 4, generator=g).double().numpy()
    white_pink = torch.randn(n, 3, size, size, generator=g).double().numpy()
    white_env = torch.randn(n, 1, size, size, generator=g).double().numpy()
    white_mod = torch.randn(n, 3, size, size, generator=g).double().numpy()
    coeffs = torch.rand(n, 3, 3, generator=g).double().numpy()
    expo = -np.log1p(-uniform)
    gam = np.stack([expo[:, 0], expo[:, 1], expo[:, 2] + expo[:, 3]], axis=1)
    weights = gam / gam.sum(axis=1, keepdims=True)
    mean, std = MEAN[None, :, None, None], STD[None, :, None, None]
    pink = _np_pink(white_pink)
    envelope = np.clip(_np_pink(white_env) * std + mean, 0, 1)  # un-normalised to pixel range, clipped
    modulated = envelope * white_mod
    ramp = np.linspace(0, 1, size)
    x, y = ramp[None, None, None, :], ramp[None, None, :, None]
    gradient = np.clip(coeffs[..., 0, None, None] * x + coeffs[..., 1, None, None] * y + coeffs[..., 2, None, None], 0, 1)
    gradient = (gradient - mean) / std
    w = weights[:, :, None, None, None]
    return w[:, 0] * pink + w[:, 1] * modulated + w[:, 2] * gradient


@pytest.mark.parametrize("size", [16, 24])
def test_mixture_equals_an_independent_numpy_implementation(size):
    np.testing.assert_allclose(mixture(5, size, _seeded(4)).double().numpy(), _np_mixture(5, size, 4),
                               rtol=1e-5, atol=2e-5)


def test_stream_images_equal_the_numpy_generator_seeded_per_image():
    """Image ``i`` of a stream is the generator's single image drawn from seed ``image_seed(i)``,
    whatever the batch size."""
    stream = SyntheticImages(5, 16, "mixture", seed=7)
    images = torch.cat(list(stream.batches(3))).double().numpy()
    for i in range(5):
        np.testing.assert_allclose(images[i], _np_mixture(1, 16, stream.image_seed(i))[0], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("generator", ["mixture", "marginal", "pink", "modulated", "gradient"])
def test_streams_are_seeded_and_sized(generator):
    a = torch.cat(list(SyntheticImages(10, 16, generator, seed=5).batches(4)))
    b = torch.cat(list(SyntheticImages(10, 16, generator, seed=5).batches(4)))
    c = torch.cat(list(SyntheticImages(10, 16, generator, seed=6).batches(4)))
    assert a.shape == (10, 3, 16, 16) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_stream_records_the_generator_version():
    assert SyntheticImages(1, 8).version == GENERATOR_VERSION == 3


def test_renormalisation_to_backbone_statistics():
    imagenet = torch.cat(list(SyntheticImages(3, 8, "gradient", 0).batches(3)))
    half = torch.cat(list(SyntheticImages(3, 8, "gradient", 0, mean=(0.5,) * 3, std=(0.5,) * 3).batches(3)))
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    torch.testing.assert_close(half * 0.5 + 0.5, imagenet * std + mean)


def test_bad_arguments():
    with pytest.raises(SoapvitError, match="--generator"):
        SyntheticImages(3, 8, "plaid")
    with pytest.raises(SoapvitError, match="--synthetic"):
        SyntheticImages(-1, 8)


@pytest.mark.parametrize("generator", ["mixture", "marginal", "pink", "modulated", "gradient"])
def test_batched_render_equals_one_image_at_a_time(generator):
    """A stream draws per image and renders the batch at once: the same images (to 1e-6) as the
    generator run on each image alone with that image's seed (what GENERATOR_VERSION 3 defines)."""
    import soapvit.data.synthetic as synthetic

    single = {"mixture": mixture, "marginal": synthetic.marginal, "pink": lambda n, s, g: pink_noise(n, 3, s, g),
              "modulated": modulated_noise, "gradient": linear_gradient}[generator]
    stream = SyntheticImages(6, 24, generator, seed=11)
    batched = torch.cat(list(stream.batches(4)))
    alone = torch.cat([single(1, 24, _seeded(stream.image_seed(i))) for i in range(6)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)


def test_dct_matrices_are_built_once_per_size_and_device(monkeypatch):
    import soapvit.data.synthetic as synthetic

    built = []
    original = synthetic.dct_matrix
    monkeypatch.setattr(synthetic, "dct_matrix", lambda n, device=None, dtype=torch.float32: built.append(n) or
                        original(n, device, dtype))
    synthetic._cached_dct.cache_clear()
    list(SyntheticImages(9, 20, "mixture", seed=1).batches(4))
    list(SyntheticImages(3, 12, "pink", seed=1).batches(4))
    assert built == [20, 12]
    synthetic._cached_dct.cache_clear()
