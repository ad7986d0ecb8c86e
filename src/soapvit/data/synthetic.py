"""Synthetic images without semantic content, generated on the device in batches, after the SOAP
authors' reference generator (dsb-ifi/soap, ``synthesize_mixture``).

Every generator works in ImageNet-normalised space, as the SOAP reference does, and the result
is re-normalised to the target backbone's mean/std when those differ. A :class:`SyntheticImages`
source is seeded per image: image ``i`` comes from its own generator seeded by ``(seed, i)``, so
the images do not depend on the batch size or on how many processes share the work.

:data:`GENERATOR_VERSION` changes whenever the images a seed gives change (version 2: the
modulated component's envelope is a std-normalised pink field in pixel range, not the raw one;
version 3: one generator per image instead of one per stream).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import distributed
from ..backbones.base import IMAGENET_MEAN, IMAGENET_STD
from ..errors import SoapvitError
from .transforms import denormalize, normalize

GENERATOR_VERSION = 3
GENERATORS = ("mixture", "marginal", "pink", "modulated", "gradient")
MARGINAL_KINDS = ("uniform", "gaussian", "pink", "gradient", "constant")
MARGINAL_PROBS = (0.05, 0.15, 0.4, 0.3, 0.1)
MIXTURE_CONCENTRATION = (1, 1, 2)
"""Dirichlet concentration over (pink, modulated, gradient); integers, see :func:`mixture_weights`"""


def dct_matrix(n: int, device=None, dtype=torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix ``C`` (``C @ x`` transforms along the first axis)."""
    k = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    i = torch.arange(n, device=device, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


@functools.lru_cache(maxsize=16)
def _cached_dct(n: int, device: torch.device) -> Tensor:
    """:func:`dct_matrix` in float32, built (in float64) once per size and device."""
    return dct_matrix(n, device=device)


@functools.lru_cache(maxsize=16)
def _cached_filter(size: int, alpha: float, device: torch.device) -> Tensor:
    return pink_filter(size, alpha, device=device)


def _device(device) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def pink_filter(size: int, alpha: float = 1.0, device=None) -> Tensor:
    """``1 / f^alpha`` over DCT frequency indices, ``f = sqrt(u² + v²)``, ``f(0, 0) := 1``."""
    u = torch.arange(size, device=device, dtype=torch.float32)
    f = torch.sqrt(u[:, None] ** 2 + u[None, :] ** 2)
    f[0, 0] = 1.0
    return f.pow(-alpha)


# Every generator is a draw (its random tensors, in a fixed order, leading dimension n) and a
# render (the deterministic image computation). A stream draws per image, from the image's own
# seed, and renders the whole batch at once.

def _shape_pink(white: Tensor, alpha: float = 1.0) -> Tensor:
    size = white.shape[-1]
    c = _cached_dct(size, _device(white.device))
    spectrum = c @ white @ c.T
    field = c.T @ (spectrum * _cached_filter(size, float(alpha), _device(white.device))) @ c
    return field / field.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def pink_noise(n: int, channels: int, size: int, generator: torch.Generator, *, alpha: float = 1.0,
               device=None) -> Tensor:
    """White Gaussian noise shaped to a ``1/f^alpha`` spectrum in the 2-D DCT domain, each
    sample's channels divided by their standard deviation."""
    return _shape_pink(torch.randn(n, channels, size, size, generator=generator, device=device), alpha)


def _envelope(white: Tensor) -> Tensor:
    return denormalize(_shape_pink(white), IMAGENET_MEAN, IMAGENET_STD).clamp(0.0, 1.0)


def pink_envelope(n: int, size: int, generator: torch.Generator, device=None) -> Tensor:
    """``(n, 3, size, size)`` envelope in [0, 1]: one std-normalised pink field per image mapped
    to pixel range with the ImageNet statistics (``x·std_c + mean_c``), then clipped."""
    return _envelope(torch.randn(n, 1, size, size, generator=generator, device=device))


def _draw_modulated(n: int, size: int, generator: torch.Generator, device=None) -> tuple[Tensor, ...]:
    return (torch.randn(n, 1, size, size, generator=generator, device=device),
            torch.randn(n, 3, size, size, generator=generator, device=device))


def _render_modulated(white_envelope: Tensor, white: Tensor) -> Tensor:
    return _envelope(white_envelope) * white


def modulated_noise(n: int, size: int, generator: torch.Generator, device=None) -> Tensor:
    """White Gaussian noise multiplied by a :func:`pink_envelope`."""
    return _render_modulated(*_draw_modulated(n, size, generator, device))


def _draw_gradient(n: int, size: int, generator: torch.Generator, device=None) -> tuple[Tensor, ...]:
    return (torch.rand(n, 3, 3, 1, 1, generator=generator, device=device),)


def _gradient(coeffs: Tensor, size: int) -> Tensor:
    ramp = torch.linspace(0.0, 1.0, size, device=coeffs.device)
    x, y = ramp[None, :].expand(size, size), ramp[:, None].expand(size, size)
    img = coeffs[:, :, 0] * x + coeffs[:, :, 1] * y + coeffs[:, :, 2]
    return normalize(img.clamp(0.0, 1.0), IMAGENET_MEAN, IMAGENET_STD)


def linear_gradient(n: int, size: int, generator: torch.Generator, device=None) -> Tensor:
    """Per channel ``c0·x + c1·y + c2`` with ``c ~ U(0, 1)``, x, y in [0, 1], clipped to [0, 1],
    then ImageNet-normalised."""
    return _gradient(*_draw_gradient(n, size, generator, device), size)


def _dirichlet(uniform: Tensor) -> Tensor:
    exponential = -torch.log1p(-uniform)  # U in [0, 1), so 1 - U > 0
    gamma = torch.stack([part.sum(dim=1) for part in exponential.split(MIXTURE_CONCENTRATION, dim=1)], dim=1)
    return gamma / gamma.sum(dim=1, keepdim=True)


def mixture_weights(n: int, generator: torch.Generator, device=None) -> Tensor:
    """``(n, 3)`` Dirichlet(:data:`MIXTURE_CONCENTRATION`) weights: each Gamma(k) draw is a sum
    of k Exp(1) draws, then every row is divided by its sum."""
    return _dirichlet(torch.rand(n, sum(MIXTURE_CONCENTRATION), generator=generator, device=device))


def _draw_mixture(n: int, size: int, generator: torch.Generator, device=None) -> tuple[Tensor, ...]:
    return (torch.rand(n, sum(MIXTURE_CONCENTRATION), generator=generator, device=device),
            torch.randn(n, 3, size, size, generator=generator, device=device),
            *_draw_modulated(n, size, generator, device), *_draw_gradient(n, size, generator, device))


def _render_mixture(uniform: Tensor, white: Tensor, white_envelope: Tensor, white_modulated: Tensor,
                    coeffs: Tensor) -> Tensor:
    weights = _dirichlet(uniform)
    parts = (_shape_pink(white), _render_modulated(white_envelope, white_modulated), _gradient(coeffs, white.shape[-1]))
    return sum(weights[:, i, None, None, None] * part for i, part in enumerate(parts))


def mixture(n: int, size: int, generator: torch.Generator, device=None) -> Tensor:
    """Per-image Dirichlet(1, 1, 2) blend of pink noise, modulated noise and a gradient."""
    return _render_mixture(*_draw_mixture(n, size, generator, device))


def _draw_marginal(n: int, size: int, generator: torch.Generator, device=None) -> tuple[Tensor, ...]:
    choice = torch.multinomial(torch.tensor(MARGINAL_PROBS, device=device), n, replacement=True,
                               generator=generator)
    return (choice, torch.rand(n, 3, size, size, generator=generator, device=device),
            torch.randn(n, 3, size, size, generator=generator, device=device),
            torch.randn(n, 3, size, size, generator=generator, device=device),
            *_draw_gradient(n, size, generator, device),
            torch.rand(n, 3, 1, 1, generator=generator, device=device))


def _render_marginal(choice: Tensor, uniform: Tensor, gaussian: Tensor, white: Tensor, coeffs: Tensor,
                     constant: Tensor) -> Tensor:
    n, _, size, _ = uniform.shape
    candidates = torch.stack([
        normalize(uniform, IMAGENET_MEAN, IMAGENET_STD),
        gaussian,
        _shape_pink(white),
        _gradient(coeffs, size),
        normalize(constant.expand(n, 3, size, size), IMAGENET_MEAN, IMAGENET_STD),
    ])
    return candidates[choice, torch.arange(n, device=choice.device)]


def marginal(n: int, size: int, generator: torch.Generator, device=None) -> Tensor:
    """One simple generator per image: uniform, Gaussian, pink, gradient or constant, with
    probabilities .05/.15/.4/.3/.1."""
    return _render_marginal(*_draw_marginal(n, size, generator, device))


def _draw_pink(n: int, size: int, generator: torch.Generator, device=None) -> tuple[Tensor, ...]:
    return (torch.randn(n, 3, size, size, generator=generator, device=device),)


_GENERATOR_FUNCS = {  # name → (draw, render)
    "mixture": (_draw_mixture, _render_mixture),
    "marginal": (_draw_marginal, _render_marginal),
    "pink": (_draw_pink, _shape_pink),
    "modulated": (_draw_modulated, _render_modulated),
    "gradient": (_draw_gradient, None),
}


@dataclass
class SyntheticImages:
    """A seeded stream of ``count`` synthetic images of ``size × size``, normalised with the
    target ``mean``/``std``; :attr:`version` is the :data:`GENERATOR_VERSION` that made them."""

    count: int
    size: int
    generator: str = "mixture"
    seed: int = 0
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    version: ClassVar[int] = GENERATOR_VERSION

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise SoapvitError(f"--generator must be one of {', '.join(GENERATORS)}, not {self.generator!r}")
        if self.count < 0:
            raise SoapvitError(f"--synthetic must be >= 0, not {self.count}")

    def image_seed(self, index: int) -> int:
        """The seed of image ``index``'s generator: a 63-bit hash of ``(seed, index)``."""
        digest = hashlib.blake2b(f"{self.seed}/{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def images(self, indices: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """Images ``indices`` as one ``(len(indices), 3, size, size)`` float tensor on ``device``."""
        device = torch.device(device)
        draw, render = _GENERATOR_FUNCS[self.generator]
        rng = torch.Generator(device=device)
        # each image from its own seed (independent of batching), then one batched render: the
        # DCT matrices are built once per size and device (cached), not per image
        draws = [draw(1, self.size, rng.manual_seed(self.image_seed(i)), device) for i in indices]
        fields = [torch.cat(parts) for parts in zip(*draws)]
        images = render(*fields) if render is not None else _gradient(*fields, self.size)
        if tuple(self.mean) != IMAGENET_MEAN or tuple(self.std) != IMAGENET_STD:
            images = normalize(denormalize(images, IMAGENET_MEAN, IMAGENET_STD), self.mean, self.std)
        return images

    def batches(self, batch_size: int, device: torch.device | str = "cpu", *, across_ranks: bool = False,
                start_step: int = 0) -> Iterator[Tensor]:
        """Yield ``(b, 3, size, size)`` float tensors on ``device``: batches of consecutive images,
        with ``across_ranks`` dealt round-robin to the processes of a :mod:`torch.distributed`
        group, from this process's batch ``start_step`` on."""
        starts = list(range(0, self.count, batch_size))
        if across_ranks:
            starts = distributed.share(starts)
        for start in starts[start_step:]:
            yield self.images(range(start, min(start + batch_size, self.count)), device)
