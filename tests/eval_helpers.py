"""Helpers for the evaluation tests: saliency folders with the usual defects and a SOAP head
built from a given projector (the toy backbones live in conftest.py)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from soapvit.corrections.soap import BlockDecomposition, SoapHead


def make_head(projector: torch.Tensor, apply_block: int = 1) -> SoapHead:
    """A head whose projector is ``I − V diag(w) Vᵀ`` with V = I: ``w = 1 − diag(projector)``
    (only diagonal projectors are expressible this way, enough for tests)."""
    d = projector.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    weights = (1 - torch.diagonal(projector)).double()
    def zeros(*shape):
        return torch.zeros(*shape, d, dtype=torch.float64)

    dec = BlockDecomposition(mean=zeros(), eigenvalues=zeros(), eigenvectors=eye, si=zeros(), weights=weights,
                             p_real=zeros(1, 1), q_synthetic=zeros(1, 1), position_share=zeros())
    return SoapHead({apply_block: dec}, apply_block, {"backbone": "toy:colour"})


def scene(rng, h, w):
    """An RGB image with a coloured rectangle on a differently coloured background, and its mask."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:] = rng.integers(0, 100, 3)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    y1, x1 = y0 + rng.integers(h // 4, h // 2), x0 + rng.integers(w // 4, w // 2)
    image[y0:y1, x0:x1] = rng.integers(150, 256, 3)
    image = np.clip(image.astype(int) + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return image, mask


def saliency_folder(root: Path, n: int = 7, seed: int = 0) -> Path:
    """``root/images`` + ``root/masks`` (ECSSD layout) with: a grayscale image, a CMYK JPEG, a
    mask of another size, an image without a mask, a corrupt image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        h, w = int(rng.integers(30, 50)), int(rng.integers(30, 60))
        image, mask = scene(rng, h, w)
        img = Image.fromarray(image)
        if i == 1:
            img = img.convert("L")
        if i == 2:
            img.convert("CMYK").save(root / "images" / f"{i:04d}.jpg", quality=95)
        else:
            img.save(root / "images" / f"{i:04d}.png")
        m = Image.fromarray(mask)
        if i == 3:
            m = m.resize((w * 2, h * 2), Image.Resampling.NEAREST)
        m.save(root / "masks" / f"{i:04d}.png")
    Image.fromarray(scene(rng, 40, 40)[0]).save(root / "images" / "nomask.png")
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "broken.png")
    return root


def noise_images(folder: Path, count: int, size: int = 16, seed: int = 0) -> Path:
    """``count`` uniform-noise RGB PNGs ``0.png …`` of ``size`` px in ``folder``."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def toy_fit(images: Path, batch_size: int = 5):
    """The corrections of a SOAP fit of the toy backbone on ``images`` (4 synthetic images, every block)."""
    from conftest import ToyBackbone

    from soapvit.fitting import fit

    return fit(ToyBackbone(), images, synthetic=4, batch_size=batch_size, device="cpu", blocks="all")[0]
