"""Seconds of a SOAP-only fit against a fit of every correction derivable from the same passes
(``--methods`` all but the calibrating ones), side by side in one process, in alternation.

    python benchmarks/fit_methods.py --model zoo:dinov2-s14-imgfocus \
        --images ../shared/data/imagenet-sample --limit 64 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from soapvit.backbones import load
from soapvit.corrections import METHODS
from soapvit.data.images import list_images
from soapvit.fitting import fit

from _record import Record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:dinov2-s14-imgfocus")
    parser.add_argument("--images", default="../shared/data/imagenet-sample")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    record = Record(__file__, parser)
    args = record.parse()
    torch.set_num_threads(args.threads)
    backbone = load(args.model, device="cpu")
    files = list_images(args.images, args.limit)
    derivable = [name for name, cls in METHODS.items() if not cls.calibrates]
    runs = {"soap": ["soap"], "derivable": derivable}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, methods in runs.items():
            start = time.perf_counter()
            fit(backbone, files, blocks="all", methods=methods, batch_size=args.batch_size, device="cpu")
            seconds[name].append(time.perf_counter() - start)
    soap, all_derivable = statistics.median(seconds["soap"]), statistics.median(seconds["derivable"])
    record.print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    record.print(f"{args.model}, {len(files)} real + {len(files)} synthetic images, every block, "
                 f"{args.repeats} alternating runs")
    record.print(f"methods of the derivable fit: {', '.join(derivable)}")
    for name in runs:
        record.print(f"{name:>10}: median {statistics.median(seconds[name]):.2f} s  (runs: "
                     f"{', '.join(f'{s:.2f}' for s in seconds[name])})")
    record.print(f"derivable / soap-only: {all_derivable / soap:.3f}")
    record.results = {"n_real": len(files), "n_synthetic": len(files), "blocks": backbone.num_blocks,
                      "methods": derivable, "median_s": {name: statistics.median(v) for name, v in seconds.items()},
                      "runs_s": seconds, "ratio": all_derivable / soap}
    record.write()


if __name__ == "__main__":
    main()
