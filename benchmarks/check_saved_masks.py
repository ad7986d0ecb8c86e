"""Recompute TokenCut's salient metrics from saved mask PNGs and the ground truth, independently
of soapvit (numpy and PIL only), and compare with the JSON that ``soapvit eval tokencut`` wrote.

    python benchmarks/check_saved_masks.py out/eval/r.json out/eval/masks ../shared/data/ecssd/masks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from _record import Record


def recompute(pred_dir: Path, gt_dir: Path) -> dict:
    thresholds = np.arange(255) / 255.0
    ious, accs, f_sum, n = [], [], np.zeros(255), 0
    for pred_path in sorted(pred_dir.glob("*.png")):
        pred = np.asarray(Image.open(pred_path), dtype=np.float64) / 255.0
        gt_img = Image.open(gt_dir / pred_path.name).convert("L")
        if gt_img.size != (pred.shape[1], pred.shape[0]):
            gt_img = gt_img.resize((pred.shape[1], pred.shape[0]), Image.Resampling.NEAREST)
        gt = np.asarray(gt_img) > 0
        fg = pred > 0.5
        union = np.logical_or(fg, gt).sum()
        ious.append(np.logical_and(fg, gt).sum() / union if union else 1.0)
        accs.append(np.mean(fg == gt))
        levels = np.round(pred * 255).astype(int).ravel()
        for i, t in enumerate(thresholds):
            m = levels > i  # pred > t on 8-bit maps
            tp = np.logical_and(m, gt.ravel()).sum()
            p = tp / m.sum() if m.sum() else 1.0
            r = tp / gt.sum() if gt.sum() else 1.0
            f_sum[i] += 1.3 * p * r / (0.3 * p + r) if (0.3 * p + r) else 0.0
        n += 1
    return {"maxFbeta": 100 * (f_sum / n).max(), "iou": 100 * np.mean(ious), "acc": 100 * np.mean(accs), "n_images": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="the JSON file soapvit eval tokencut wrote")
    parser.add_argument("masks", type=Path, help="its saved mask PNGs (a soap/ subfolder for the SOAP variant)")
    parser.add_argument("gt", type=Path, help="the ground-truth masks")
    record = Record(__file__, parser)
    args = record.parse()
    result, masks, gt = args.result, args.masks, args.gt
    payload = json.loads(result.read_text())
    pairs = [("original", payload, masks)] + ([("soap", payload["soap"], masks / "soap")] if "soap" in payload else [])
    worst = 0.0
    for name, reported, folder in pairs:
        again = recompute(folder, gt)
        diffs = {k: abs(again[k] - reported[k]) for k in again}
        worst = max(worst, *diffs.values())
        record.print(f"{name} {({k: round(v, 4) for k, v in again.items()})} max |difference| to JSON: "
                     f"{max(diffs.values()):.2e}")
        record.results[name] = {"recomputed": again, "max_abs_difference": max(diffs.values())}
    record.results["max_abs_difference"] = worst
    record.write()
    sys.exit(0 if worst < 1e-6 else 1)


if __name__ == "__main__":
    main()
