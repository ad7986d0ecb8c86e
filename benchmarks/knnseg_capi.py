"""CAPI-protocol kNN segmentation (``soapvit eval knnseg --protocol capi``) end to end: wall time
of each stage, query patches/s of the search, images/s, peak memory.

    python benchmarks/knnseg_capi.py --model zoo:mae --root ../shared/data/camvid --train-limit 120 --val-limit 60

Peak memory as ``_segmentation.measured`` takes it. ``--compare-hummingbird`` also times the hummingbird protocol on the same splits.
"""

from __future__ import annotations

import argparse

from soapvit.eval.knnseg import KnnConfig, evaluate_knnseg

from _record import Record
from _segmentation import measured, open_run


def run(backbone, train, val, config, label, record: Record, key: str):
    m = measured(lambda: evaluate_knnseg(backbone, train, val, config=config))
    report, wall = m.value, m.wall_s
    s = report.seconds
    r = report.results["original"]
    extra = f", k={r['k']}, {r['distance']}" if "k" in r else ""
    record.print(f"{label}: mIoU {r['miou']:.2f}, acc {r['acc']:.2f}{extra}; bank {report.bank_size} patches, "
                 f"{report.n_queries} query patches")
    choice = f", choice {s['choice']:.1f} s" if "choice" in s else ""
    record.print(f"  wall {wall:.1f} s (train features {s['bank']:.1f} s{choice}"
                 f", search {s['search']:.1f} s); {report.patches_per_second:.0f} query patches/s in the search; "
                 f"{report.settings['n_val'] / wall:.2f} val images/s end to end")
    record.print(f"  peak RSS {m.peak_rss_mb:.0f} MB (process so far), tracemalloc peak "
                 f"{m.tracemalloc_peak_mb:.1f} MB{m.cuda_text()}")
    record.results[key] = {
        "label": label, "miou": r["miou"], "acc": r["acc"],
        **({"k": r["k"], "distance": r["distance"]} if "k" in r else {}),
        "bank_size": report.bank_size, "n_queries": report.n_queries, "n_train": len(train),
        "n_val": report.settings["n_val"],
        "image_size": config.image_size or (224 if config.protocol == "capi" else backbone.image_size), "wall_s": wall,
        "seconds": dict(s), "query_patches_per_s": report.patches_per_second,
        "val_images_per_s": report.settings["n_val"] / wall, **m.memory()}
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
    backbone, train, val = open_run(args, record)
    run(backbone, train, val, KnnConfig(protocol="capi", image_size=args.image_size, memory_mb=args.memory_mb),
        "capi", record, "capi")
    if args.compare_hummingbird:
        run(backbone, train, val, KnnConfig(memory_mb=args.memory_mb), "hummingbird (k=30, T=0.02)",
            record, "hummingbird")
    record.write()


if __name__ == "__main__":
    main()
