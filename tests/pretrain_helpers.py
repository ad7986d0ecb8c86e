"""Toy labelled images and tar shards for the pre-training tests."""

import io
import tarfile

import numpy as np
import torch
from PIL import Image


def toy_images(n=32, size=16, classes=4, seed=0):
    """Class = colour and stripe orientation, plus noise: learnable structure for every objective."""
    g = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    yy, xx = np.mgrid[:size, :size]
    imgs = []
    for c in labels:
        stripes = np.sin((xx if c % 2 else yy) * (1 + c) * 0.8)
        rgb = np.stack([stripes * (1 if k == c % 3 else 0.3) for k in range(3)])
        imgs.append(np.clip(127 + 90 * rgb + g.normal(0, 12, rgb.shape), 0, 255))
    return torch.tensor(np.stack(imgs), dtype=torch.uint8), torch.tensor(labels)


def write_shards(folder, images, labels):
    folder.mkdir()
    with tarfile.open(folder / "train-000000.tar", "w") as tar:
        for i, (img, lab) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            for name, data in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.cls", str(int(lab)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
