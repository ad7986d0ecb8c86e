"""kNN segmentation search throughput: query patches/s of the chunked top-k vote at several
memory budgets (CPU, and CUDA when present), against one unchunked similarity matrix.

    python benchmarks/knnseg_throughput.py --bank 60000 --queries 8000

Sizes default to CamVid at 224 px (16×21 patches): a capped bank of 60,000 training patches and
the queries of about 24 test images; ViT-S width 384, 11 classes, k=30, T=0.02.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from soapvit.eval.knnseg import knn_vote

from _record import Record


def timed(fn, device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def unchunked(queries, bank, labels, k, temperature):
    top, idx = (queries @ bank.T).topk(k, dim=1)
    return torch.einsum("qk,qkc->qc", torch.softmax(top / temperature, 1), labels[idx])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=int, default=60_000)
    parser.add_argument("--queries", type=int, default=8_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--budgets", default="64,256,1024", help="memory_mb values")
    parser.add_argument("--threads", type=int, default=2)
    record = Record(__file__, parser)
    args = record.parse()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(args.bank, args.dim, generator=g), dim=1)
    queries = F.normalize(torch.randn(args.queries, args.dim, generator=g), dim=1)
    labels = torch.softmax(torch.randn(args.bank, args.classes, generator=g), 1)
    full_mb = args.queries * args.bank * 4 / 2**20
    record.print(f"# bank {args.bank} x {args.dim}, {args.queries} queries, k={args.k}; "
                 f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                 f"torch {torch.__version__}")
    record.print(f"{'search':34s} {'device':6s} {'patches/s':>10s} {'× unchunked':>12s}")
    record.results = {"unchunked_mb": full_mb, "rows": []}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        b, q, lab = bank.to(device), queries.to(device), labels.to(device)
        if device.type == "cuda":
            knn_vote(q[:256], b, lab, args.k, 0.02)  # warm-up
        t_full, ref = timed(lambda: unchunked(q, b, lab, args.k, 0.02), device)
        record.print(f"{f'unchunked ({full_mb:.0f} MB block)':34s} {device.type:6s} {args.queries / t_full:10.0f} "
                     f"{1.0:12.2f}")
        record.results["rows"].append({"search": "unchunked", "budget_mb": None, "device": device.type,
                                       "seconds": t_full, "patches_per_s": args.queries / t_full, "ratio": 1.0})
        for budget in (float(x) for x in args.budgets.split(",")):
            t, out = timed(lambda: knn_vote(q, b, lab, args.k, 0.02, memory_mb=budget), device)
            assert torch.allclose(out, ref, atol=1e-5), "chunked vote differs from the unchunked one"
            record.print(f"{f'chunked, {budget:.0f} MB budget':34s} {device.type:6s} {args.queries / t:10.0f} "
                         f"{t_full / t:12.2f}")
            record.results["rows"].append({"search": "chunked", "budget_mb": budget, "device": device.type,
                                           "seconds": t, "patches_per_s": args.queries / t, "ratio": t_full / t})
    record.write()


if __name__ == "__main__":
    main()
