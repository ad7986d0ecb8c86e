"""Where to apply the head: the same fit's projector applied at each of several blocks (propagated
through the later blocks), scored by TokenCut on ECSSD and kNN segmentation on CamVid.

    python scripts/head_block_sweep.py --model zoo:dinov2-s14-imgfocus --head runs/imgfocus.safetensors \
        --blocks 2,5,8,11 --limit 100 --out results/sweep-imgfocus.json

The head must have been fitted with ``--blocks all`` (or at least the swept blocks); its weighting
settings are kept, only the block changes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from soapvit.backbones import load
from soapvit.data.saliency import SaliencyDataset
from soapvit.data.segmentation import SegmentationSplit
from soapvit.eval.knnseg import evaluate_knnseg
from soapvit.eval.salient import evaluate_tokencut
from soapvit.corrections import CorrectionSet, SoapConfig, SoapHead
from soapvit.corrections.soap import removed


def head_config(head: SoapHead) -> SoapConfig:
    meta = head.metadata
    return SoapConfig(variant=meta["variant"], weighting=meta["weighting"], mu=meta["mu"], tau=meta["tau"],
                      alpha=meta["alpha"], gamma=meta["gamma"], threshold=meta["threshold"], remove=meta["remove"])


def first(split: SegmentationSplit, n: int) -> SegmentationSplit:
    split.samples = split.samples[:n]
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--head", required=True, type=Path)
    parser.add_argument("--blocks", default="2,5,8,11")
    parser.add_argument("--ecssd", default="../shared/data/ecssd", type=Path)
    parser.add_argument("--camvid", default="../shared/data/camvid", type=Path)
    parser.add_argument("--limit", type=int, default=100, help="ECSSD images, CamVid train and test images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    corrections = CorrectionSet.load(args.head)
    fitted = corrections.soap
    backbone = load(args.model)
    corrections.check_backbone(backbone)
    saliency = SaliencyDataset.from_folders(args.ecssd / "images", args.ecssd / "masks", limit=args.limit)
    train = first(SegmentationSplit.open(args.camvid / "train"), args.limit)
    val = first(SegmentationSplit.open(args.camvid / "test", what="--val"), args.limit)
    rows = {}
    for block in (int(b) for b in args.blocks.split(",")):
        head = fitted.reweighted(head_config(fitted), apply_block=block)
        tokencut = evaluate_tokencut(backbone, saliency, corrections={"soap": head}).results
        knn = evaluate_knnseg(backbone, train, val, corrections={"soap": head}).results
        rows[block] = {"removed": [c + 1 for c in removed(head.blocks[block].weights)],
                       "tokencut": {v: tokencut[v] for v in ("original", "soap")},
                       "knnseg": {v: {k: knn[v][k] for k in ("miou", "acc")} for v in ("original", "soap")}}
        print(block, rows[block]["tokencut"]["soap"]["maxFbeta"], rows[block]["knnseg"]["soap"]["miou"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "head": str(args.head), "limit": args.limit, "blocks": rows},
                                   indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
