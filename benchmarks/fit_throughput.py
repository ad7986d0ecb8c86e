"""Images/s of ``soapvit fit`` (every block collected in one pass) against a forward-only pass
of the same backbone over the same real and synthetic images, measured side by side; under
torchrun both share the images between the processes (fit as ``torchrun … -m soapvit fit`` does).

    python benchmarks/fit_throughput.py --model zoo:dinov2-s14-imgfocus \
        --images ../shared/data/imagenet-sample --limit 256 --device cpu
    torchrun --nproc-per-node 2 benchmarks/fit_throughput.py --model zoo:mae \
        --images ../shared/data/imagenet-sample --limit 256 --device cpu
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from soapvit import distributed
from soapvit.backbones import load
from soapvit.data.images import list_images
from soapvit.data.sources import ImageFiles
from soapvit.data.synthetic import SyntheticImages
from soapvit.data.transforms import ImageTransform
from soapvit.features import encode, iter_tokens, resolve_device
from soapvit.fitting import fit

from _record import Record


def forward_only(backbone, files, synthetic, transform, batch_size, device) -> None:
    """Decode and encode this process's share of the images, last block only, nothing accumulated."""
    for _ in iter_tokens(backbone, ImageFiles(files), transform, batch_size=batch_size, across_ranks=True):
        pass
    for pixels in synthetic.batches(batch_size, device, across_ranks=True):
        encode(backbone, pixels)


def timed(job) -> float:
    """Seconds until every process has finished ``job``."""
    distributed.barrier()
    start = time.perf_counter()
    job()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    distributed.barrier()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:dinov2-s14-imgfocus")
    parser.add_argument("--images", default="../shared/data/imagenet-sample")
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--repeats", type=int, default=2)
    record = Record(__file__, parser)
    args = record.parse()

    torch.set_num_threads(args.threads)
    device = distributed.setup(resolve_device(args.device))
    backbone = load(args.model, device=str(device))
    files = list_images(args.images, args.limit)
    transform = ImageTransform.for_backbone(backbone)
    synthetic = SyntheticImages(len(files), transform.output_size(1, 1)[0], mean=backbone.image_mean,
                                std=backbone.image_std)
    n = len(files) + synthetic.count
    # warm-up (allocator, kernels, page cache)
    encode(backbone, next(synthetic.batches(args.batch_size, device)))

    rows = []
    for _ in range(args.repeats):
        t_forward = timed(lambda: forward_only(backbone, files, synthetic, transform, args.batch_size, device))
        t_fit = timed(lambda: fit(backbone, files, blocks="all", batch_size=args.batch_size, device=device))
        rows.append((n / t_forward, n / t_fit))
    if not distributed.is_main():
        return
    forward_ips = max(r[0] for r in rows)
    fit_ips = max(r[1] for r in rows)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or 'cpu'} ({args.threads} thread(s) per process)")
    record.print(f"model {args.model} · {len(files)} real + {synthetic.count} synthetic images · "
                 f"batch {args.batch_size} · "
                 f"{distributed.world_size()} process(es) · {name}")
    record.print(f"forward only (last block): {forward_ips:8.2f} images/s")
    record.print(f"fit (all {backbone.num_blocks} blocks)  : {fit_ips:8.2f} images/s")
    record.print(f"ratio fit / forward       : {fit_ips / forward_ips:8.3f}")
    record.results = {"n_real": len(files), "n_synthetic": synthetic.count, "blocks": backbone.num_blocks,
                      "processes": distributed.world_size(), "forward_images_per_s": forward_ips,
                      "fit_images_per_s": fit_ips, "ratio": fit_ips / forward_ips,
                      "repeats": [{"forward_images_per_s": f, "fit_images_per_s": t} for f, t in rows]}
    record.write()


if __name__ == "__main__":
    main()
