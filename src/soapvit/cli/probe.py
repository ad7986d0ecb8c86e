"""``soapvit probe`` (CLS / mean / AbMILP probes, linear or kNN, optionally on SOAP-corrected
tokens) and ``soapvit attention`` (CLS-attention entropy per block, figure comparing models)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import SoapvitError
from . import app, report
from .common import (FOLDER_OUT, AllowOtherOpt, OutOpt, DeviceOpt, HeadOpt, ModelOpt, RichProgress, ThreadsOpt, VariantsOpt,
                     check_writable, corrections_for, load_backbone, say, set_threads, write_json)

DATA_HELP = ("DIR or DIR:SPLIT — tar shards DIR/SPLIT-*.tar[.gz] (e.g. ../shared/data/tiny-imagenet), or an "
             "ImageFolder with one sub-folder per class (in DIR/SPLIT if it exists).")


def default_cache() -> Path:
    """``$SOAPVIT_CACHE/probe``, else ``~/.cache/soapvit/probe``."""
    return Path(os.environ.get("SOAPVIT_CACHE") or Path.home() / ".cache" / "soapvit") / "probe"


def parse_pools(value: str) -> list[str]:
    from ..aggregate import POOLS

    pools = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in pools if p not in POOLS]
    if bad or not pools:
        raise SoapvitError(f"--pool must be a comma list of {', '.join(POOLS)}, not {value!r}")
    return pools


@app.command("probe")
def probe_command(
    model: ModelOpt,
    train: Annotated[str, typer.Option(help=f"Training data (default split 'train'): {DATA_HELP}")],
    val: Annotated[str, typer.Option(help="Validation data (default split 'val'), same forms as --train.")],
    pool: Annotated[str, typer.Option(help="Comma list of pools: cls, mean, abmilp.")] = "cls,mean,abmilp",
    method: Annotated[str, typer.Option(help="linear (trained BN+linear head) or knn (cls/mean only).")] = "linear",
    head: HeadOpt = None,
    variants: VariantsOpt = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size (default: the model's).")] = None,
    per_class: Annotated[int | None, typer.Option(help="Use the first N training images of each class.")] = None,
    val_per_class: Annotated[int | None, typer.Option(help="Use the first N validation images of each class.")] = None,
    views: Annotated[int, typer.Option(help="Cached views per training image: 1 = plain, k = plain + k−1 "
                                            "augmented (random resized crop + flip).")] = 1,
    optimizer: Annotated[str, typer.Option(help="lars (MAE recipe) or adamw.")] = "lars",
    epochs: Annotated[int, typer.Option(help="Training epochs over the cache.")] = 90,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up epochs.")] = 10,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate; default 6.4 for LARS (MAE: 0.1 × 16384/256), "
                                                  "1e-3 for AdamW.")] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 0.0,
    probe_batch_size: Annotated[int, typer.Option(help="Probe training batch size.")] = 256,
    abmilp_depth: Annotated[int, typer.Option(help="AbMILP scorer: number of linear layers.")] = 1,
    abmilp_activation: Annotated[str, typer.Option(help="AbMILP scorer activation: relu, tanh, gelu.")] = "relu",
    abmilp_self_attention: Annotated[str, typer.Option(help="none, map (scores only) or both.")] = "none",
    abmilp_conditioning: Annotated[str, typer.Option(help="none or pe (2-D sin-cos position).")] = "none",
    knn_k: Annotated[int, typer.Option(help="Neighbours for --method knn.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    cache_dir: Annotated[Path | None, typer.Option(
        help="Feature cache folder (default: $SOAPVIT_CACHE/probe, else ~/.cache/soapvit/probe)."), FOLDER_OUT] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature cache.")] = False,
    out: OutOpt = None,
    device: DeviceOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of views and probe training.")] = 0,
    allow_other_backbone: AllowOtherOpt = False,
    threads: ThreadsOpt = 1,
) -> None:
    """Probe a frozen backbone: CLS vs mean vs AbMILP pooling, top-1/top-5 on --val."""
    from ..aggregate import AbMILPConfig, ProbeConfig, run_probe
    from ..data.labelled import load_labelled

    pools = parse_pools(pool)
    set_threads(threads)
    config = ProbeConfig(optimizer=optimizer, epochs=epochs, batch_size=probe_batch_size, lr=lr,
                         warmup_epochs=warmup_epochs, weight_decay=weight_decay, seed=seed)
    abmilp = AbMILPConfig(abmilp_depth, abmilp_activation, abmilp_self_attention, abmilp_conditioning)
    if method not in ("linear", "knn"):
        raise SoapvitError(f"--method must be one of linear, knn, not {method!r}")
    check_writable(out)
    cache = None if no_cache else cache_dir or default_cache()
    if cache is not None and not cache.is_dir():  # a file, or a folder that cannot be made: one line, before any work
        check_writable(cache, "--cache-dir" if cache_dir else "the probe cache ($SOAPVIT_CACHE/probe)")
    train_data = load_labelled(train, "train", per_class=per_class, what="--train")
    val_data = load_labelled(val, "val", per_class=val_per_class, what="--val")
    backbone, corrections = corrections_for(model, head, variants, device, allow_other_backbone)
    say(f"{model}: {len(train_data)} train / {len(val_data)} val images, {train_data.num_classes} classes")
    with RichProgress() as progress:
        run = run_probe(backbone, train_data, val_data, pools=pools, method=method, corrections=corrections,
                        image_size=image_size, views=views, config=config, abmilp=abmilp, knn_k=knn_k,
                        cache_dir=cache, batch_size=batch_size, progress=progress)
    run.settings["head"] = str(head) if head else None
    settings = run.settings
    say(f"encoding {run.seconds['encode']:.1f} s ({settings['cache_parts_reused']}/{settings['cache_parts']} cache "
        f"parts reused), total {run.seconds['total']:.1f} s")
    table = Table(title=escape(f"{method} probes — {model} at {run.image_size} px"))
    for col in ("pool", "tokens", "top-1 %", "top-5 %", "weight entropy", "patches for 90%"):
        table.add_column(col, justify="right")
    for r in run.rows():
        table.add_row(r.pool, r.tokens, f"{100 * r.top1:.2f}", f"{100 * r.top5:.2f}",
                      "-" if r.weight_entropy is None else f"{r.weight_entropy:.2f}",
                      "-" if r.weight_count90 is None else f"{r.weight_count90:.1f} / {run.num_patches}")
    report.print(table)
    write_json(out, run.to_dict())


@app.command("attention")
def attention_command(
    model: Annotated[list[str], typer.Option(help="Backbone id; repeat to compare models.")],
    images: Annotated[str, typer.Option(help=f"Images (default split 'val'): {DATA_HELP} A flat folder works too.")],
    out: Annotated[Path, typer.Option(help="Output folder: attention.json and attention.png."), FOLDER_OUT],
    limit: Annotated[int | None, typer.Option(help="Use at most N images.")] = 500,
    image_size: Annotated[list[int] | None, typer.Option(
        help="Square input size: once for every model or once per --model, in order (default: each model's).")] = None,
    probe_results: Annotated[list[Path] | None, typer.Option(
        help="JSON from soapvit probe --out: adds the AbMILP weight statistics to the figure.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: DeviceOpt = None,
    threads: ThreadsOpt = 1,
) -> None:
    """Entropy of the CLS token's attention over patches, and the patches holding 90% of it, per block."""
    from ..aggregate import attention_profile
    from ..data.labelled import load_labelled
    from ..plots import plot_attention_profiles

    set_threads(threads)
    sizes = list(image_size or [])
    if len(sizes) not in (0, 1, len(model)):
        raise SoapvitError(f"--image-size: give one size or one per --model ({len(model)}), not {len(sizes)}")
    sizes = sizes * len(model) if len(sizes) == 1 else sizes or [None] * len(model)
    check_writable(out / "attention.json")
    abmilp = {}
    for path in probe_results or []:
        if not path.is_file():
            raise SoapvitError(f"--probe-results: {path} does not exist")
        try:
            run = json.loads(path.read_text())
            abmilp[run["model_id"]] = {k: run["results"]["original"]["abmilp"][f"weight_{k}"]
                                       for k in ("entropy", "count90")}
        except (ValueError, KeyError, TypeError) as err:
            raise SoapvitError(f"--probe-results: {path} is not a probe JSON with AbMILP results ({err!r})") from None
    backbones = [load_backbone(m, device) for m in model]
    sizes = [size or backbone.image_size for size, backbone in zip(sizes, backbones)]
    # a folder of mixed-size images is resized once at read time, to the largest input size
    data = load_labelled(images, "val", limit=limit, size=max(sizes), what="--images")
    with RichProgress() as progress:
        profiles = [attention_profile(backbone, data, image_size=size, batch_size=batch_size, progress=progress)
                    for backbone, size in zip(backbones, sizes)]
    write_json(out / "attention.json", {"profiles": [p.to_dict() for p in profiles], "abmilp": abmilp})
    say(f"wrote {plot_attention_profiles(profiles, out / 'attention.png', abmilp)}")
    for p in profiles:
        table = Table(title=escape(f"CLS attention over {p.num_patches} patches — {p.model_id} ({p.images} images)"))
        for col in ("block", "entropy (nats)", "/ log N", "patches for 90%", "CLS→patch mass"):
            table.add_column(col, justify="right")
        stats = p.results
        for b, (e, c, m) in enumerate(zip(stats["entropy"], stats["count90"], stats["patch_mass"])):
            table.add_row(str(b), f"{e:.3f}", f"{e / p.max_entropy:.3f}", f"{c:.1f}", f"{m:.3f}")
        report.print(table)
