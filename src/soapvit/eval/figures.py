"""Figure: image, ground truth and the predicted masks of each variant, one row per image."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .salient import Example  # noqa: E402

TITLES = {"original": "original", "soap": "SOAP"}


def plot_mask_comparison(examples: list[Example], path: str | Path) -> Path:
    """One row per example: image, ground truth, then each variant's mask (scored prediction)."""
    if not examples:
        raise ValueError("no examples to plot")
    variants = list(examples[0].predictions)
    cols = 2 + len(variants)
    fig, axes = plt.subplots(len(examples), cols, figsize=(2.6 * cols, 2.2 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples):
        panels = [(ex.image, "image"), (ex.ground_truth, "ground truth")]
        panels += [(ex.predictions[v], TITLES.get(v, v)) for v in variants]
        for ax, (data, title) in zip(row, panels):
            ax.imshow(data, cmap=None if data.ndim == 3 else "gray", vmin=0, vmax=None if data.ndim == 3 else data.max() or 1)
            ax.set_title(f"{title}" if title != "image" else ex.stem, fontsize=8)
            ax.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
