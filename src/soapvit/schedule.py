"""The learning-rate schedule shared by pre-training and probe training."""

from __future__ import annotations

import math


def learning_rate(step: float, total: float, warmup: float, peak: float, final: float = 0.0) -> float:
    """Linear warm-up from 0 to ``peak`` over the first ``warmup`` steps, then half-cosine decay
    to ``final`` at ``total`` (held there after). Steps may be any unit: optimiser steps, epochs
    or the fraction of the run done (``total = 1``)."""
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(total - warmup, 1e-9))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
