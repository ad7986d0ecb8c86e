"""What the CamVid segmentation benchmarks share: the backbone and the two splits (each cut to a
limit), the header line, and one evaluation timed with its peak memory.

Peak memory: the process's maximum resident set (``resource.getrusage``, includes torch's
tensors), the peak of Python-level allocations (``tracemalloc``; torch's CPU tensors are not
traced there) and, on a GPU, torch's peak allocation.
"""

from __future__ import annotations

import dataclasses
import platform
import resource
import time
import tracemalloc
from dataclasses import dataclass

import torch

from soapvit.backbones import load
from soapvit.data.segmentation import SegmentationSplit


def subset(split: SegmentationSplit, limit: int | None) -> SegmentationSplit:
    return split if limit is None else dataclasses.replace(split, samples=split.samples[:limit])


def open_run(args, record):
    """``(backbone, train, val)`` of ``args`` (model, root, train_limit, val_limit, threads, device),
    with the header line printed into ``record``."""
    torch.set_num_threads(args.threads)
    backbone = load(args.model, device=args.device)
    train = subset(SegmentationSplit.open(f"{args.root}/train"), args.train_limit)
    val = subset(SegmentationSplit.open(f"{args.root}/test", what="--val"), args.val_limit)
    record.print(f"# {args.model} on {args.root}: {len(train)} train, {len(val)} test images; "
                 f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                 f"torch {torch.__version__}, device {args.device}")
    return backbone, train, val


@dataclass
class Measured:
    value: object  # what the call returned
    wall_s: float
    tracemalloc_peak_mb: float
    peak_rss_mb: float  # of the process so far
    cuda_peak_mb: float | None

    def memory(self) -> dict:
        """The memory figures as the JSON records them (no CUDA key without a GPU)."""
        out = {"peak_rss_mb": self.peak_rss_mb, "tracemalloc_peak_mb": self.tracemalloc_peak_mb}
        return out | ({"cuda_peak_mb": self.cuda_peak_mb} if self.cuda_peak_mb is not None else {})

    def cuda_text(self) -> str:
        return f", CUDA peak {self.cuda_peak_mb:.0f} MB" if self.cuda_peak_mb is not None else ""


def measured(call) -> Measured:
    """Run ``call()`` once, timed, with its memory peaks."""
    tracemalloc.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    value = call()
    wall = time.perf_counter() - t0
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return Measured(value, wall, traced / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None)
