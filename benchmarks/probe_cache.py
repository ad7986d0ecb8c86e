"""Feature cache speed-up: the same probe run twice on one backbone, first with an empty cache
(every image encoded), then reading the cache; prints both timings and their ratio.

    python benchmarks/probe_cache.py --model zoo:dinov2-s14-imgfocus --per-class 3 --val-per-class 2 --image-size 112
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from soapvit.aggregate import ProbeConfig, run_probe
from soapvit.data.labelled import load_labelled
from soapvit.backbones import load

from _record import Record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:dinov2-s14-imgfocus")
    parser.add_argument("--data", default="../shared/data/tiny-imagenet")
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--val-per-class", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--pools", default="cls,mean,abmilp")
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    record = Record(__file__, parser)
    args = record.parse()
    torch.set_num_threads(args.threads)
    train = load_labelled(args.data, "train", per_class=args.per_class)
    val = load_labelled(args.data, "val", per_class=args.val_per_class)
    backbone = load(args.model)
    config = ProbeConfig(epochs=args.epochs)
    pools = args.pools.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for label in ("first run (empty cache)", "second run (cache)"):
            t0 = time.perf_counter()
            run = run_probe(backbone, train, val, pools=pools, image_size=args.image_size, config=config,
                            cache_dir=cache_dir, batch_size=args.batch_size)
            rows.append((label, time.perf_counter() - t0, run))
    record.print(f"{args.model} at {rows[0][2].image_size} px, {len(train)} train + {len(val)} val images, "
                 f"pools {args.pools}, {args.epochs} epochs, torch threads {args.threads}")
    record.print(f"{'run':<26}{'total s':>10}{'encode s':>10}{'train s':>10}{'parts reused':>14}  top-1 per pool")
    record.results = {"image_size": rows[0][2].image_size, "n_train": len(train), "n_val": len(val), "runs": []}
    for label, seconds, run in rows:
        train_s = sum(r.seconds for r in run.rows())
        accs = " ".join(f"{r.pool}={100 * r.top1:.1f}" for r in run.rows())
        record.print(f"{label:<26}{seconds:>10.1f}{run.seconds['encode']:>10.1f}{train_s:>10.1f}"
                     f"{run.settings['cache_parts_reused']:>8}/{run.settings['cache_parts']:<5}  {accs}")
        record.results["runs"].append({"label": label, "total_s": seconds, "encode_s": run.seconds["encode"],
                                       "train_s": train_s, "cache_parts_reused": run.settings["cache_parts_reused"],
                                       "cache_parts": run.settings["cache_parts"],
                                       "top1": {r.pool: 100 * r.top1 for r in run.rows()}})
    same = [r.top1 for r in rows[0][2].rows()] == [r.top1 for r in rows[1][2].rows()]
    record.print(f"speed-up of the second run: {rows[0][1] / rows[1][1]:.1f}x (identical accuracies: {same})")
    record.results |= {"speedup": rows[0][1] / rows[1][1], "identical_accuracies": same}
    record.write()


if __name__ == "__main__":
    main()
