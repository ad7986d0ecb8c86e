"""TokenCut solver throughput: batched torch (Lanczos, dense eigh; CPU and CUDA when present)
against the per-image ``scipy.linalg.eigh(D − A, D)`` reference on the same patch features, with
the share of pixels on which their masks agree (patch masks upsampled to each image's size).

Real features (encoded once, not timed):

    python benchmarks/tokencut_solver.py --model zoo:dinov2-s14-imgfocus \
        --images ../shared/data/ecssd/images --features tokens --tau 0.3

Without ``--model``: synthetic object/background features on a 21×29 grid (ECSSD's usual size).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from soapvit.eval.tokencut import tokencut_mask_scipy, tokencut_masks, upsample_nearest

from _record import Record


def real_features(args) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """(features (h, w, D), original (H, W)) per image, from one forward pass each."""
    from PIL import Image

    from soapvit.backbones import load
    from soapvit.data.images import list_images, load_image
    from soapvit.eval.salient import TokenCutConfig
    from soapvit.features import encode

    backbone = load(args.model, device="cpu")
    transform = TokenCutConfig(features=args.features).image_transform(backbone)
    block = backbone.num_blocks - 1
    out = []
    for path in list_images(args.images, args.limit):
        image = load_image(path)
        feats = encode(backbone, transform(image)[None], block, keys=args.features == "keys")
        grid = feats.keys if args.features == "keys" else feats.tokens[block]
        out.append((grid[0], Image.open(path).size[::-1]))
    return out


def synthetic_features(n: int, h: int = 21, w: int = 29, d: int = 384) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = torch.rand(2, generator=g) * torch.tensor([h, w])
        obj = ((((yy - cy) / (h / 4)) ** 2 + ((xx - cx) / (w / 4)) ** 2) < 1).float()[..., None]
        base = torch.randn(2, d, generator=g)
        out.append((obj * base[0] + (1 - obj) * base[1] + 1.5 * torch.randn(h, w, d, generator=g), (h * 14, w * 14)))
    return out


def batched(items, tau, method, device, batch_size) -> tuple[float, list[np.ndarray]]:
    groups: dict[tuple, list[int]] = {}
    for i, (f, _) in enumerate(items):
        groups.setdefault(tuple(f.shape), []).append(i)
    masks: list = [None] * len(items)
    stacked = {k: torch.stack([items[i][0] for i in idx]).to(device) for k, idx in groups.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for key, idx in groups.items():
        for first in range(0, len(idx), batch_size):
            out = tokencut_masks(stacked[key][first : first + batch_size], tau, method=method).masks.cpu()
            for j, i in enumerate(idx[first : first + batch_size]):
                masks[i] = out[j].numpy()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, masks


def pixel_agreement(items, a, b) -> float:
    same = total = 0
    for (_, size), ma, mb in zip(items, a, b):
        up = upsample_nearest(torch.from_numpy(np.stack([ma, mb])), size)
        same += int((up[0] == up[1]).sum())
        total += up[0].numel()
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--images", default="../shared/data/ecssd/images")
    parser.add_argument("--features", default="tokens", choices=["tokens", "keys"])
    parser.add_argument("--tau", type=float)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--synthetic", type=int, default=200, help="images when no --model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    record = Record(__file__, parser)
    args = record.parse()
    torch.set_num_threads(args.threads)
    tau = args.tau if args.tau is not None else (0.3 if args.features == "tokens" else 0.2)
    items = real_features(args) if args.model else synthetic_features(args.synthetic)
    source = f"{args.model} {args.features} on {args.images}" if args.model else "synthetic 21x29x384"
    record.print(f"# {len(items)} images, {source}, tau={tau}; {platform.processor() or platform.machine()}, "
                 f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")

    start = time.perf_counter()
    reference = [tokencut_mask_scipy(f.numpy(), tau) for f, _ in items]
    t_ref = time.perf_counter() - start
    rows = [("scipy eigh per image (reference)", "cpu", t_ref, 1.0)]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for method in ("lanczos", "eigh"):
            if device.type == "cuda":  # warm-up: kernels, cuSOLVER handles
                batched(items[: args.batch_size], tau, method, device, args.batch_size)
            seconds, masks = batched(items, tau, method, device, args.batch_size)
            rows.append((f"torch batched {method}", device.type, seconds, pixel_agreement(items, masks, reference)))
    record.print(f"{'solver':36s} {'device':6s} {'images/s':>9s} {'× scipy':>8s} {'pixels = scipy':>15s}")
    pixels = sum(size[0] * size[1] for _, size in items)
    record.results = {"n_images": len(items), "source": source, "tau": tau, "pixels": pixels, "rows": []}
    for name, dev, seconds, agree in rows:
        record.print(f"{name:36s} {dev:6s} {len(items) / seconds:9.1f} {t_ref / seconds:8.2f} {100 * agree:14.3f}%")
        record.results["rows"].append({"solver": name, "device": dev, "seconds": seconds,
                                       "images_per_s": len(items) / seconds, "ratio": t_ref / seconds,
                                       "pixels_equal_percent": 100 * agree})
    record.write()


if __name__ == "__main__":
    main()
