"""CAPI-protocol kNN segmentation (``soapvit eval knnseg --protocol capi``) end to end: wall time
of each stage, query patches/s of the search, images/s, peak memory.

    python benchmarks/knnseg_capi.py --model zoo:mae --root ../shared/data/camvid --train-limit 120 --val-limit 60

Peak memory: the process's maximum resident set (``resource.getrusage``, includes torch's
tensors) and the peak of Python-level allocations (``tracemalloc``; torch's CPU tensors are not
traced there). ``--compare-hummingbird`` also times the hummingbird protocol on the same splits.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import time
import tracemalloc

import torch

from soapvit.backbones import load
from soapvit.data.segmentation import SegmentationSplit
from soapvit.eval.knnseg import KnnConfig, evaluate_knnseg

from _record import Record


def subset(split: SegmentationSplit, limit: int | None) -> SegmentationSplit:
    return split if limit is None else dataclasses.replace(split, samples=split.samples[:limit])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(backbone, train, val, config, label, record: Record, key: str):
    tracemalloc.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = evaluate_knnseg(backbone, train, val, config=config)
    wall = time.perf_counter() - t0
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    s = report.seconds
    r = report.results["original"]
    extra = f", k={r['k']}, {r['distance']}" if "k" in r else ""
    record.print(f"{label}: mIoU {r['miou']:.2f}, acc {r['acc']:.2f}{extra}; bank {report.bank_size} patches, "
                 f"{report.n_queries} query patches")
    choice = f", choice {s['choice']:.1f} s" if "choice" in s else ""
    record.print(f"  wall {wall:.1f} s (train features {s['bank']:.1f} s{choice}"
                 f", search {s['search']:.1f} s); {report.patches_per_second:.0f} query patches/s in the search; "
                 f"{report.settings['n_val'] / wall:.2f} val images/s end to end")
    cuda = f", CUDA peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if torch.cuda.is_available() else ""
    record.print(f"  peak RSS {peak_rss_mb():.0f} MB (process so far), tracemalloc peak {traced / 2**20:.1f} MB{cuda}")
    record.results[key] = {
        "label": label, "miou": r["miou"], "acc": r["acc"],
        **({"k": r["k"], "distance": r["distance"]} if "k" in r else {}),
        "bank_size": report.bank_size, "n_queries": report.n_queries, "n_train": len(train),
        "n_val": report.settings["n_val"],
        "image_size": config.image_size or (224 if config.protocol == "capi" else backbone.image_size), "wall_s": wall,
        "seconds": dict(s), "query_patches_per_s": report.patches_per_second,
        "val_images_per_s": report.settings["n_val"] / wall, "peak_rss_mb": peak_rss_mb(),
        "tracemalloc_peak_mb": traced / 2**20,
        **({"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {})}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:mae")
    parser.add_argument("--root", default="../shared/data/camvid")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None, help="square side (default 224, CAPI)")
    parser.add_argument("--memory-mb", type=float, default=256.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compare-hummingbird", action="store_true")
    record = Record(__file__, parser)
    args = record.parse()
    torch.set_num_threads(args.threads)
    backbone = load(args.model, device=args.device)
    train = subset(SegmentationSplit.open(f"{args.root}/train"), args.train_limit)
    val = subset(SegmentationSplit.open(f"{args.root}/test", what="--val"), args.val_limit)
    record.print(f"# {args.model} on {args.root}: {len(train)} train, {len(val)} test images; "
                 f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                 f"torch {torch.__version__}, device {args.device}")
    run(backbone, train, val, KnnConfig(protocol="capi", image_size=args.image_size, memory_mb=args.memory_mb),
        "capi", record, "capi")
    if args.compare_hummingbird:
        run(backbone, train, val, KnnConfig(memory_mb=args.memory_mb), "hummingbird (k=30, T=0.02)",
            record, "hummingbird")
    record.write()


if __name__ == "__main__":
    main()
