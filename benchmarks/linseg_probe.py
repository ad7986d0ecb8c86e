"""Linear segmentation probe (``soapvit eval linseg``) end to end: feature caching, training
iterations/s, evaluation images/s and query patches/s, peak memory, and the probe's mIoU.

    python benchmarks/linseg_probe.py --model zoo:mae --root ../shared/data/camvid --iterations 1000

Peak memory as ``_segmentation.measured`` takes it; the float16 feature cache's size is computed
from its shape.
"""

from __future__ import annotations

import argparse

from soapvit.eval.linear_seg import LinearSegConfig, evaluate_linear_seg

from _record import Record
from _segmentation import measured, open_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:mae")
    parser.add_argument("--root", default="../shared/data/camvid")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=LinearSegConfig.iterations)
    parser.add_argument("--batch-size", type=int, default=LinearSegConfig.batch_size)
    parser.add_argument("--image-size", type=int, default=None, help="square side (default: the model's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    record = Record(__file__, parser)
    args = record.parse()
    backbone, train, val = open_run(args, record)
    config = LinearSegConfig(iterations=args.iterations, batch_size=args.batch_size, image_size=args.image_size)
    m = measured(lambda: evaluate_linear_seg(backbone, train, val, config=config))
    report, wall = m.value, m.wall_s
    s, r = report.seconds, report.results["original"]
    side = report.settings["input"][0]
    grid = side // backbone.patch_size
    cache_mb = report.n_train * grid * grid * backbone.embed_dim * 2 / 2**20
    n_val = report.settings["n_val"]
    record.print(f"input {side}x{side} ({grid}x{grid} patches), {config.iterations} iterations of "
                 f"{config.batch_size} images")
    record.print(f"mIoU {r['miou']:.2f}, pixel acc {r['acc']:.2f}; loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}")
    record.print(f"wall {wall:.1f} s: features {s['features']:.1f} s "
                 f"({report.n_train / s['features']:.1f} train images/s), "
                 f"training {s['train']:.1f} s ({config.iterations / s['train']:.1f} iterations/s), "
                 f"evaluation {s['eval']:.1f} s ({n_val / s['eval']:.2f} images/s, "
                 f"{n_val * grid * grid / s['eval']:.0f} query patches/s)")
    record.print(f"peak RSS {m.peak_rss_mb:.0f} MB, tracemalloc peak "
                 f"{m.tracemalloc_peak_mb:.1f} MB, float16 feature cache {cache_mb:.1f} MB per variant{m.cuda_text()}")
    record.results = {
        "miou": r["miou"], "acc": r["acc"], "first_loss": r["first_loss"], "final_loss": r["final_loss"],
        "input": side, "grid": grid, "iterations": config.iterations, "batch_size": config.batch_size,
        "n_train": report.n_train, "n_val": n_val, "wall_s": wall, "seconds": dict(s),
        "train_images_per_s": report.n_train / s["features"], "iterations_per_s": config.iterations / s["train"],
        "val_images_per_s": n_val / s["eval"], "query_patches_per_s": n_val * grid * grid / s["eval"],
        **m.memory(), "feature_cache_mb": cache_mb}
    record.write()


if __name__ == "__main__":
    main()
