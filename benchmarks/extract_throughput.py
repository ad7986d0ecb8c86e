"""Images/s of ``soapvit extract`` (original + every correction of a head, written as fp16 shards)
against a forward-only pass of the same pipeline (the same variants computed, nothing written),
measured side by side on the same images; the ratio is the cost of writing.

    python benchmarks/extract_throughput.py --model zoo:dinov2-s14-imgfocus \
        --images src/soapvit/assets/sample_images --limit 48
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from soapvit.backbones import load
from soapvit.data.sources import open_images
from soapvit.data.transforms import ImageTransform
from soapvit.extract import extract
from soapvit.features import iter_tokens
from soapvit.fitting import fit

from _record import Record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:dinov2-s14-imgfocus")
    parser.add_argument("--images", default="src/soapvit/assets/sample_images")
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    record = Record(__file__, parser)
    args = record.parse()
    torch.set_num_threads(args.threads)

    backbone = load(args.model, device="cpu")
    corrections, _ = fit(backbone, args.images, limit=16, synthetic=8, blocks="last", batch_size=args.batch_size,
                         device="cpu", methods=["soap", "posmean"])
    source = open_images(args.images, args.limit)
    transform = ImageTransform.for_backbone(backbone)

    def forward_only() -> None:
        for _ in iter_tokens(backbone, source, transform, corrections=corrections, batch_size=args.batch_size):
            pass

    def extracting() -> None:
        folder = Path(tempfile.mkdtemp(prefix="extract-bench-"))
        try:
            extract(backbone, source, folder, corrections=corrections, dtype=args.dtype, batch_size=args.batch_size)
        finally:
            shutil.rmtree(folder)

    times = {"forward": [], "extract": []}
    for _ in range(args.repeats):  # alternated, best of each: the machine is shared
        for name, job in (("forward", forward_only), ("extract", extracting)):
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    n = len(source)
    best = {k: min(v) for k, v in times.items()}
    record.print(f"{args.model} · {n} images · batch {args.batch_size} · "
                 f"variants original+{'+'.join(corrections)} · "
                 f"{args.dtype} · {args.threads} thread(s) · torch {torch.__version__} · "
                 f"{platform.processor() or platform.machine()}")
    record.print(f"forward only   {n / best['forward']:7.2f} images/s  ({best['forward']:.2f} s)")
    record.print(f"extract        {n / best['extract']:7.2f} images/s  ({best['extract']:.2f} s)")
    record.print(f"ratio extract / forward: {best['forward'] / best['extract']:.3f}")
    record.results = {"n_images": n, "variants": ["original", *corrections],
                      "forward_images_per_s": n / best["forward"], "extract_images_per_s": n / best["extract"],
                      "forward_s": best["forward"], "extract_s": best["extract"],
                      "ratio": best["forward"] / best["extract"], "runs_s": times}
    record.write()


if __name__ == "__main__":
    main()
