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


def pink_filter(size: int, alpha: float = 1.0, device=None) -> Tensor:
    """``1 / f^alpha`` over DCT frequency indices, ``f = sqrt(u² + v²)``, ``f(0, 0) := 1``."""
    u = torch.arange(size, device=device, dtype=torch.float32)
    f = torch.sqrt(u[:, None] ** 2 + u[None, :] ** 2)
    f[0, 0] = 1.0
    return f.pow(-alpha)


def pink_noise(n: int, channels: int, size: int, generator: torch.Generator, *, alpha: float = 1.0,
               device=None) -> Tensor:
    """White Gaussian noise shaped to a ``1/f^alpha`` spectrum in the 2-D DCT domain, each
    sample's channels divided by their standard deviation."""
    white = torch.randn(n, channels, size, size, generator=generator, device=device)
    c = dct_matrix(size, device=device)
    spectrum = c @ white @ c.T
    field = c.T @ (spectrum * pink_filter(size, alpha, device=device)) @ c
    return field / field.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def pink_envelope(n: int, size: int, generator: torch.Generator, device=None) -> Tensor:
    """``(n, 3, size, size)`` envelope in [0, 1]: one std-normalised pink field per image mapped
    to pixel range with the ImageNet statistics (``x·std_c + mean_c``), then clipped."""
    field = pink_noise(n, 1, size, generator, device=device)
    return denormalize(field, IMAGENET_MEAN, IMAGENET_STD).clamp(0.0, 1.0)


def modulated_noise(n: int, size: int, generator: torch.Generator, device=None) -> Tensor:
    """White Gaussian noise multiplied by a :func:`pink_envelope`."""
    envelope = pink_envelope(n, size, generator, device=device)
    return envelope * torch.randn(n, 3, size, size, generator=generator, device=device)


def linear_gradient(n: int, size: int, generator: torch.Generator, device=None) -> Tensor:
    """Per channel ``c0·x + c1·y + c2`` with ``c ~ U(0, 1)``, x, y in [0, 1], clipped to [0, 1],
    then ImageNet-normalised."""
    coeffs = torch.rand(n, 3, 3, 1, 1, generator=generator, device=device)
    ramp = torch.linspace(0.0, 1.0, size, device=device)
    x, y = ramp[None, :].expand(size, size), ramp[:, None].expand(size, size)
    img = coeffs[:, :, 0] * x + coeffs[:, :, 1] * y + coeffs[:, :, 2]
    return normalize(img.clamp(0.0, 1.0), IMAGENET_MEAN, IMAGENET_STD)


def mixture_weights(n: int, generator: torch.Generator, device=None) -> Tensor:
    """``(n, 3)`` Dirichlet(:data:`MIXTURE_CONCENTRATION`) weights: each Gamma(k) draw is a sum
    of k Exp(1) draws, then every row is divided by its sum."""
    uniform = torch.rand(n, sum(MIXTURE_CONCENTRATION), generator=generator, device=device)
    exponential = -torch.log1p(-uniform)  # U in [0, 1), so 1 - U > 0
    gamma = torch.stack([part.sum(dim=1) for part in exponential.split(MIXTURE_CONCENTRATION, dim=1)], dim=1)
    return gamma / gamma.sum(dim=1, keepdim=True)


def mixture(n: int, size: int, generator: torch.Generator, device=None) -> Tensor:
    """Per-image Dirichlet(1, 1, 2) blend of pink noise, modulated noise and a gradient."""
    weights = mixture_weights(n, generator, device=device)
    parts = (
        pink_noise(n, 3, size, generator, device=device),
        modulated_noise(n, size, generator, device=device),
        linear_gradient(n, size, generator, device=device),
    )
    return sum(weights[:, i, None, None, None] * part for i, part in enumerate(parts))


def marginal(n: int, size: int, generator: torch.Generator, device=None) -> Tensor:
    """One simple generator per image: uniform, Gaussian, pink, gradient or constant, with
    probabilities .05/.15/.4/.3/.1."""
    choice = torch.multinomial(torch.tensor(MARGINAL_PROBS, device=device), n, replacement=True,
                               generator=generator)
    candidates = torch.stack([
        normalize(torch.rand(n, 3, size, size, generator=generator, device=device), IMAGENET_MEAN, IMAGENET_STD),
        torch.randn(n, 3, size, size, generator=generator, device=device),
        pink_noise(n, 3, size, generator, device=device),
        linear_gradient(n, size, generator, device=device),
        normalize(torch.rand(n, 3, 1, 1, generator=generator, device=device).expand(n, 3, size, size),
                  IMAGENET_MEAN, IMAGENET_STD),
    ])
    return candidates[choice, torch.arange(n, device=device)]


_GENERATOR_FUNCS = {
    "mixture": mixture,
    "marginal": marginal,
    "pink": lambda n, size, g, device=None: pink_noise(n, 3, size, g, device=device),
    "modulated": modulated_noise,
    "gradient": linear_gradient,
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
        make = _GENERATOR_FUNCS[self.generator]
        rng = torch.Generator(device=device)
        images = torch.cat([make(1, self.size, rng.manual_seed(self.image_seed(i)), device=device) for i in indices])
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
