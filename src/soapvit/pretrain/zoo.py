"""Train the model zoo back to back in one process and export it (``python -m
soapvit.pretrain.zoo``): same ViT, same data, same wall-clock budget per objective.

Per objective: measure images/s for a few steps, set the epochs so the schedule fits the
budget, train with periodic checkpoints (a restarted job resumes them), export the encoder as
``<out>/<name>.safetensors`` with a model card. ``--probe`` adds kNN probe accuracies (CLS and
mean of patch tokens, soapvit.aggregate) to the cards.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ..backbones.vit import VisionTransformerBackbone, read_card
from ..data.shards import load_labelled_shards
from .trainer import OBJECTIVES, TrainConfig, build_objective, export_backbone, train

ZOO_VIT = {"image_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 6, "num_heads": 4}
ZOO_OPTIONS = {"dino": {"local_crops": 2}, "ibot": {"local_crops": 2}}
MACHINE = f"{platform.machine()} CPU, {torch.get_num_threads()} threads (2 cores shared with 4 other jobs), no GPU"


def _say(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def calibrated_epochs(config: TrainConfig, images, labels, seconds: float, probe_steps: int = 4) -> float:
    """Epochs that fit ``seconds`` at the images/s measured over ``probe_steps`` steps."""
    model = build_objective(config, int(labels.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = images[: config.batch_size]
    times = []
    for step in range(probe_steps + 1):
        t0 = time.monotonic()
        loss = model.loss(batch, labels[: config.batch_size], torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.monotonic() - t0)
    rate = config.batch_size / (sum(times[1:]) / probe_steps)
    return round(max(0.02, rate * seconds / images.shape[0]), 3), rate


def train_zoo(data: Path, out: Path, work: Path, names: list[str], minutes: float, batch_size: int) -> None:
    images, labels = load_labelled_shards(data, "train")
    _say(f"loaded {images.shape[0]} training images from {data}")
    for name in names:
        target = out / f"{name}.safetensors"
        if target.exists():
            _say(f"{name}: {target} exists, skipped")
            continue
        ckpt = work / f"{name}.pt"
        resume = ckpt if ckpt.exists() else None
        config = TrainConfig(name, batch_size=batch_size, vit=dict(ZOO_VIT), options=ZOO_OPTIONS.get(name, {}))
        if resume is None:
            config.epochs, rate = calibrated_epochs(config, images, labels, minutes * 60)
            _say(f"{name}: {rate:.1f} images/s → {config.epochs} epochs for {minutes} min")

        def log(s, name=name):
            if s.step % 10 == 0 or s.step == s.total_steps:
                _say(f"{name} step {s.step}/{s.total_steps} loss {s.loss:.4f} lr {s.lr:.2e} {s.images_per_s:.1f} img/s")

        result = train(config, images, labels, ckpt, resume=resume, max_seconds=minutes * 60 * 1.6,
                       checkpoint_every_s=120, log=log)
        _say(f"{name}: step {result.step}/{result.total_steps} in {result.elapsed_s:.0f} s, final loss {result.final_loss:.4f}")
        card = {"machine": MACHINE, "data": f"{data} train ({images.shape[0]} images, 64 px)",
                "date": time.strftime("%Y-%m-%d"), "finished_schedule": result.finished}
        export_backbone(ckpt, target, card)
        _say(f"{name}: exported {target} ({target.stat().st_size / 1e6:.2f} MB)")


def probe_zoo(data: Path, out: Path, names: list[str], per_class: int) -> None:
    from ..aggregate import load_labelled, run_probe

    train_set = load_labelled(data, "train", per_class=per_class)
    val_set = load_labelled(data, "val", what="--val")
    for name in names:
        path = out / f"{name}.safetensors"
        backbone = VisionTransformerBackbone.from_checkpoint(path, f"zoo:{name}")
        run = run_probe(backbone, train_set, val_set, pools=("cls", "mean"), method="knn", batch_size=128)
        scores = {f"knn_{r.pool}_top1": round(r.top1, 4) for r in run.results}
        card = read_card(path) | {"probe": {"method": "kNN k=20 T=0.07 (soapvit.aggregate)", **scores,
                                            "train": f"{len(train_set)} train images ({per_class}/class)",
                                            "val": f"{len(val_set)} val images", "seconds": round(run.seconds, 1)}}
        backbone.save(path, card)
        path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
        _say(f"{name}: {scores}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "zoo")
    parser.add_argument("--work", type=Path, default=Path("zoo-checkpoints"))
    parser.add_argument("--names", default=",".join(OBJECTIVES))
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probe", action="store_true", help="probe the exported models instead of training")
    parser.add_argument("--per-class", type=int, default=50, help="training images per class for the kNN bank")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    names = [n for n in args.names.split(",") if n]
    if args.probe:
        probe_zoo(args.data, args.out, names, args.per_class)
    else:
        train_zoo(args.data, args.out, args.work, names, args.minutes, args.batch_size)


if __name__ == "__main__":
    main()
