"""Latency of the exported ONNX model (correction folded in, onnxruntime CPU) against the torch
forward with the correction (``attach``), same batch, same threads; median of several runs.

    python benchmarks/onnx_latency.py --model zoo:dinov2-s14-imgfocus --batch-size 1 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from soapvit.backbones import load
from soapvit.corrections import attach
from soapvit.export import export_onnx, onnx_session
from soapvit.fitting import fit

from _record import Record


def median_seconds(job, runs: int) -> float:
    job()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        job()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:dinov2-s14-imgfocus")
    parser.add_argument("--images", default="src/soapvit/assets/sample_images")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    record = Record(__file__, parser)
    args = record.parse()
    torch.set_num_threads(args.threads)

    backbone = load(args.model, device="cpu")
    corrections, _ = fit(backbone, args.images, limit=16, synthetic=8, blocks="last", device="cpu")
    head = corrections["soap"]
    corrected = attach(backbone, head)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        report = export_onnx(backbone, path, correction=head, correction_name="soap")
        session = onnx_session(path, threads=args.threads)
        record.print(f"{args.model} + soap head · {args.threads} thread(s) · torch {torch.__version__} · "
                     f"max abs difference {max(report.differences.values()):.2g} ({', '.join(report.differences)})")
        record.results = {"max_abs_difference": max(report.differences.values()),
                          "differences": dict(report.differences), "batches": []}
        for batch in args.batch_size:
            x = torch.randn(batch, 3, backbone.image_size, backbone.image_size)
            with torch.no_grad():
                t_torch = median_seconds(lambda: corrected(x), args.runs)
            t_onnx = median_seconds(lambda: session.run(None, {"pixels": x.numpy()}), args.runs)
            record.print(f"batch {batch:3d}: torch {1000 * t_torch:8.1f} ms · onnxruntime {1000 * t_onnx:8.1f} ms · "
                         f"speed-up {t_torch / t_onnx:.2f}×")
            record.results["batches"].append({"batch": batch, "torch_ms": 1000 * t_torch, "onnx_ms": 1000 * t_onnx,
                                              "speedup": t_torch / t_onnx})
    record.write()


if __name__ == "__main__":
    main()
