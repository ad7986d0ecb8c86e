"""Train, probe and analyse the model zoo (``python scripts/train_zoo.py``): the same ViT on the
same data with each pre-training objective and the same compute.

Per objective (default): train with the schedule on CPU time (``TrainConfig.cpu_budget_s``:
equal compute on a machine shared with other jobs, whatever their load) or, with
``--cpu-minutes 0``, on ``--epochs``; checkpoints every two minutes (a restarted job resumes
them), a wall-clock cap; then export the encoder as ``<out>/<name>.safetensors`` with a model card.
``--probe`` adds kNN and linear probe accuracies (CLS and mean of patch tokens) to the cards;
``--analyse`` fits SOAP on every block and measures attention distances, with figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import soapvit
from soapvit.backbones.vit import ViTConfig, VisionTransformerBackbone, read_card
from soapvit.data.shards import load_labelled_shards
from soapvit.pretrain import MIM_OBJECTIVES, OBJECTIVES, TrainConfig, export_backbone, train

ZOO_VIT = {"image_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 6, "num_heads": 4}
ZOO_OPTIONS = {"dino": {"local_crops": 2}, "ibot": {"local_crops": 2}}
MACHINE = f"{platform.machine()} CPU, 1 thread (2 cores shared with 4 other jobs), no GPU"


def _say(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def train_zoo(data: Path, out: Path, work: Path, names: list[str], cpu_minutes: float, epochs: float,
              wall_cap_minutes: float, batch_size: int) -> None:
    images, labels = load_labelled_shards(data, "train")
    _say(f"loaded {images.shape[0]} training images from {data}")
    for name in names:
        target = out / f"{name}.safetensors"
        if target.exists():
            _say(f"{name}: {target} exists, skipped")
            continue
        ckpt = work / f"{name}.pt"
        resume = ckpt if ckpt.exists() else None
        config = TrainConfig(name, epochs=epochs, batch_size=batch_size, vit=dict(ZOO_VIT),
                             options=ZOO_OPTIONS.get(name, {}), cpu_budget_s=cpu_minutes * 60 or None)

        def log(s, name=name):
            if s.step % 10 == 0 or s.step == s.total_steps:
                _say(f"{name} step {s.step} loss {s.loss:.4f} lr {s.lr:.2e} {s.images_per_s:.1f} img/s")

        result = train(config, images, labels, ckpt, resume=resume, max_seconds=wall_cap_minutes * 60,
                       checkpoint_every_s=120, log=log)
        _say(f"{name}: {result.step} steps, {result.cpu_s:.0f} CPU-s, {result.elapsed_s:.0f} s wall, "
             f"final loss {result.final_loss:.4f}, schedule {'complete' if result.finished else 'CUT by the wall cap'}")
        card = {"machine": MACHINE, "data": f"{data} train ({images.shape[0]} images, 64 px)",
                "date": time.strftime("%Y-%m-%d"), "finished_schedule": result.finished}
        export_backbone(ckpt, target, card)
        _say(f"{name}: exported {target} ({target.stat().st_size / 1e6:.2f} MB)")


def probe_zoo(data: Path, out: Path, names: list[str], per_class: int, linear_epochs: int, cache: Path) -> None:
    """kNN and linear probes (CLS, mean of patch tokens) of every zoo model and of a randomly
    initialised ViT of the same architecture (the floor any pre-training must clear)."""
    from soapvit.aggregate import ProbeConfig, run_probe
    from soapvit.data.labelled import load_labelled

    train_set = load_labelled(data, "train", per_class=per_class)
    val_set = load_labelled(data, "val", what="--val")
    linear = ProbeConfig(epochs=linear_epochs, warmup_epochs=max(1, linear_epochs // 9))
    for name in names + ["random-init"]:
        path = out / f"{name}.safetensors"
        if name == "random-init":
            torch.manual_seed(0)
            backbone = VisionTransformerBackbone(ViTConfig(**ZOO_VIT), "vit:random-init")
        else:
            backbone = VisionTransformerBackbone.from_checkpoint(path, f"zoo:{name}")
        scores = {}
        for method, extra in (("knn", {}), ("linear", {"config": linear})):
            run = run_probe(backbone, train_set, val_set, pools=("cls", "mean"), method=method, batch_size=128,
                            cache_dir=cache, **extra)
            scores |= {f"{method}_{r.pool}_top1": round(r.top1, 4) for r in run.rows()}
        probe = {"knn": "k=20, T=0.07", "linear": f"LARS, {linear_epochs} epochs, batch 256 (soapvit.aggregate)",
                 **scores, "train": f"{len(train_set)} train images ({per_class}/class)",
                 "val": f"{len(val_set)} val images (all)"}
        if name == "random-init":
            (cache / "random-init.json").write_text(json.dumps(probe, indent=2) + "\n")
        else:
            card = read_card(path) | {"probe": probe}
            backbone.save(path, card)
            path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
        _say(f"{name}: {scores}")


def analyse_zoo(data: Path, images: Path, out: Path, names: list[str], work: Path, figures: Path,
                attention_images: int = 500) -> dict:
    """SOAP fit of every block (natural images resized to the zoo resolution, as many synthetic
    ones) and mean attention distance per block and head on Tiny-ImageNet val images; writes
    ``figures/zoo_*.png`` (MIM models solid, the others dashed) and returns (and stores in
    ``work/analysis.json``) the numbers."""
    from soapvit.data.transforms import normalize
    from soapvit.corrections.soap import high_si
    from soapvit.fitting import fit
    from soapvit.plots import plot_max_si_per_block, plot_si_curves
    from soapvit.pretrain.analysis import mean_attention_distance, query_attention

    val, _ = load_labelled_shards(data, "val", limit=attention_images, size=ZOO_VIT["image_size"])
    heads, results = {}, {}
    for name in names:
        backbone = VisionTransformerBackbone.from_checkpoint(out / f"{name}.safetensors", f"zoo:{name}")
        head = fit(backbone, images, image_size=backbone.image_size, blocks="all", batch_size=64, num_workers=0)[0].soap
        head.save(work / f"soap-{name}.safetensors")
        heads[name] = head
        pixels = normalize(val.float() / 255, backbone.image_mean, backbone.image_std)
        distance = mean_attention_distance(backbone, pixels)
        last = head.blocks[max(head.blocks)]
        results[name] = {
            "max_si_per_block": [round(float(head.blocks[b].si.max()), 4) for b in sorted(head.blocks)],
            "last_block_si_ge_075": high_si(last.si).numel(),
            "last_block_top_si": [round(float(v), 3) for v in last.si.sort(descending=True).values[:3]],
            "attention_distance_px": distance.round(decimals=2).tolist(),
            "query_map_last_block": query_attention(backbone, pixels, -1, (3, 3)).mean(0).round(decimals=4).tolist(),
        }
        _say(f"{name}: max SI per block {results[name]['max_si_per_block']}, mean attention distance per block "
             f"{distance.mean(1).round(decimals=1).tolist()}")
    figures.mkdir(parents=True, exist_ok=True)
    dashed = [n for n in names if n not in MIM_OBJECTIVES]
    plot_max_si_per_block(heads, figures / "zoo_max_si_per_block.png", dashed=dashed)
    plot_si_curves(heads, figures / "zoo_si_curves.png", dashed=dashed)
    _plot_attention(results, figures, dashed)
    (work / "analysis.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _plot_attention(results: dict, figures: Path, dashed: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, *maps) = plt.subplots(1, 1 + len(results), figsize=(4 + 2 * len(results), 3.2),
                                    gridspec_kw={"width_ratios": [3] + [1] * len(results)})
    for name, r in results.items():
        dist = torch.tensor(r["attention_distance_px"])
        x = torch.arange(dist.shape[0])
        line = ax.plot(x, dist.mean(1), "--" if name in dashed else "-", label=name)[0]
        ax.scatter(x.repeat_interleave(dist.shape[1]), dist.flatten(), s=8, color=line.get_color(), alpha=0.5)
    ax.set(xlabel="block", ylabel="mean attention distance (px)", title="attention distance per head")
    ax.legend(fontsize=7)
    for axis, (name, r) in zip(maps, results.items()):
        axis.imshow(r["query_map_last_block"], cmap="viridis")
        axis.add_patch(plt.Rectangle((2.5, 2.5), 1, 1, fill=False, color="red"))
        axis.set_title(f"{name}\nlast block, query (3,3)", fontsize=7)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(figures / "zoo_attention.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(soapvit.__file__).parent / "assets" / "zoo")
    parser.add_argument("--work", type=Path, default=Path("zoo-checkpoints"))
    parser.add_argument("--names", default=",".join(OBJECTIVES))
    parser.add_argument("--cpu-minutes", type=float, default=6.0,
                        help="CPU-time budget per model; 0 = schedule on --epochs")
    parser.add_argument("--epochs", type=float, default=5.0, help="schedule length (a cap under a CPU budget)")
    parser.add_argument("--wall-cap-minutes", type=float, default=14.0, help="stop a model after this wall time")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probe", action="store_true", help="probe the exported models instead of training")
    parser.add_argument("--analyse", action="store_true", help="SOAP fit + attention distance of the exported models")
    parser.add_argument("--images", type=Path, default=Path("../shared/data/imagenet-sample"))
    parser.add_argument("--figures", type=Path, default=Path("docs/zoo"))
    parser.add_argument("--per-class", type=int, default=50, help="training images per class for the probes")
    parser.add_argument("--linear-epochs", type=int, default=30)
    parser.add_argument("--cache", type=Path, default=Path("zoo-checkpoints/probe-cache"))
    args = parser.parse_args(argv)
    # one thread: on the shared 2-core machine two OpenMP threads spin-wait on each other and
    # ran a training step 10x slower (measured: 5.8 s vs 0.54 s)
    torch.set_num_threads(1)
    names = [n for n in args.names.split(",") if n]
    args.work.mkdir(parents=True, exist_ok=True)
    if args.analyse:
        analyse_zoo(args.data, args.images, args.out, names, args.work, args.figures)
    elif args.probe:
        probe_zoo(args.data, args.out, names, args.per_class, args.linear_epochs, args.cache)
    else:
        train_zoo(args.data, args.out, args.work, names, args.cpu_minutes, args.epochs, args.wall_cap_minutes,
                  args.batch_size)


if __name__ == "__main__":
    main()
