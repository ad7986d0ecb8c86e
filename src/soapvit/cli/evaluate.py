"""``soapvit eval tokencut``, ``knnseg`` (hummingbird and capi protocols), ``linseg`` and ``warp``: every
variant of a corrections file beside the original tokens, with paired intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from . import eval_app, report
from .common import (AllowOtherOpt, DeviceOpt, HeadOpt, ModelOpt, OutOpt, RichProgress, ThreadsOpt, VariantsOpt,
                     check_writable, corrections_for, print_log, print_side_by_side, say, set_threads, write_json)


# the options every labelled-segmentation evaluation (knnseg, linseg) takes to open its splits
TrainSplitOpt = Annotated[Path | None, typer.Option(
    "--train", help="Training split: images/+labels/ folder, ADE20K images/<split>, VOC "
                    "ImageSets/Segmentation/<split>.txt or Cityscapes leftImg8bit/<split>; or --dataset and --root.")]
ValSplitOpt = Annotated[Path | None, typer.Option("--val", help="Evaluation split, same layouts.")]
SegDatasetOpt = Annotated[str | None, typer.Option(
    "--dataset", help="Named layout under --root: ade20k, voc, cityscapes, camvid, folder.")]
RootOpt = Annotated[Path | None, typer.Option("--root", help="The dataset's root folder (with --dataset).")]
TrainSplitNameOpt = Annotated[str | None, typer.Option(
    "--train-split", help="With --dataset: the training split (default train).")]
ValSplitNameOpt = Annotated[str | None, typer.Option(
    "--val-split", help="With --dataset: the evaluation split (default val; camvid: test).")]
LayoutOpt = Annotated[str, typer.Option("--layout", help="auto, camvid, folder, ade20k, voc or cityscapes.")]
IgnoreOpt = Annotated[int | None, typer.Option("--ignore-index", help="Label to ignore (default: the layout's).")]


@eval_app.command("tokencut")
def tokencut_command(
    model: ModelOpt,
    images: Annotated[Path | None, typer.Option(help="Folder of images (ECSSD, DUTS-TE, DUT-OMRON …); or --dataset and --root.")] = None,
    masks: Annotated[Path | None, typer.Option(help="Folder of masks matched by stem (default: a sibling masks/, gt/ … folder).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Named layout under --root: ecssd, duts, dut-omron, folder (masks: salient metrics and CorLoc), voc, coco (boxes: CorLoc only).")] = None,
    root: Annotated[Path | None, typer.Option(help="The dataset's root folder (with --dataset).")] = None,
    split: Annotated[str | None, typer.Option(help="voc: ImageSets/Main/<split>.txt (default: every annotation); coco: train2017, val2017 … (default: the only instances_*.json).")] = None,
    drop_hard: Annotated[bool, typer.Option("--drop-hard", help="voc: leave out truncated and difficult objects and images with no other object.")] = False,
    head: HeadOpt = None,
    variants: VariantsOpt = None,
    protocol: Annotated[str, typer.Option(help="tokencut (last-block keys, τ=0.2, ε=1e-5; Wang et al.) or soap (output tokens, τ=0.3; the SOAP authors).")] = "soap",
    features: Annotated[str | None, typer.Option(help="Override the protocol's features: tokens (final-norm output tokens) or keys (last-block keys).")] = None,
    tau: Annotated[float | None, typer.Option(help="Override the protocol's affinity threshold τ.")] = None,
    eps: Annotated[float | None, typer.Option(help="Weight of non-edges (default: the protocol's, 1e-5).")] = None,
    gt_boxes: Annotated[str, typer.Option(help="CorLoc ground truth from a mask: components (a box per 8-connected component) or bbox (one box).")] = "components",
    bilateral: Annotated[bool, typer.Option("--bilateral", help="Refine with the bilateral solver (λ=256, σ 16/16/8, 25 CG iterations).")] = False,
    resize: Annotated[str, typer.Option(help="aspect (each side to its nearest patch multiple, TokenCut) or square (fixed size).")] = "aspect",
    image_size: Annotated[int | None, typer.Option(help="aspect: shorter side before rounding (default: keep); square: the side.")] = None,
    resample: Annotated[str, typer.Option(help="lanczos (TokenCut), bicubic, bilinear, nearest.")] = "lanczos",
    solver: Annotated[str, typer.Option(help="lanczos (batched, iterative) or eigh (batched, dense).")] = "lanczos",
    batch_size: Annotated[int, typer.Option(help="Images of one input size per forward pass and solve.")] = 8,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most N images.")] = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    allow_other_backbone: AllowOtherOpt = False,
    threads: ThreadsOpt = 1,
    save_masks: Annotated[Path | None, typer.Option(help="Save the scored masks as PNG named by image stem (each variant in a subfolder named after it).")] = None,
    figure: Annotated[Path | None, typer.Option(help="Comparison figure (default with --head and --out: next to the JSON).")] = None,
) -> None:
    """TokenCut salient-object segmentation (maxFβ, IoU, accuracy) and single-object discovery (CorLoc), percent."""
    from .. import distributed
    from ..data.datasets import open_discovery
    from ..eval.salient import TokenCutConfig, evaluate_tokencut
    from ..plots import plot_mask_comparison

    set_threads(threads)
    config = TokenCutConfig(protocol=protocol, features=features, tau=tau, eps=eps, gt_boxes=gt_boxes,
                            bilateral=bilateral, resize=resize, image_size=image_size, resample=resample,
                            solver=solver, batch_size=batch_size)
    data = open_discovery(dataset, root, images=images, masks=masks, split=split, drop_hard=drop_hard,
                             limit=limit)
    for path in (out, figure):
        check_writable(path)
    backbone, corrections = corrections_for(model, head, variants, device, allow_other_backbone)
    with RichProgress() as progress:
        result = evaluate_tokencut(backbone, data, corrections=corrections, config=config, save_masks=save_masks,
                                   progress=progress)
    result.settings.update(head=str(head) if head else None, images=str(images) if images else None,
                           dataset=dataset, root=str(root) if root else None)
    print_log(result)
    columns = [("maxFbeta", "maxFβ"), ("iou", "IoU"), ("acc", "Acc"), ("corloc", "CorLoc"), ("n_images", "images")]
    columns = [c for c in columns if c[0] in result.results["original"]]
    name = f"TokenCut ({protocol} protocol) on {images or root} — {model}, {config.features}, τ={config.tau}"
    final = {v: r for v, r in result.results.items() if "/" not in v}
    if config.bilateral:
        print_side_by_side(name + ", no solver", {v.split("/")[0]: r for v, r in result.results.items() if "/" in v},
                           columns)
    print_side_by_side(name + (", bilateral solver" if config.bilateral else ""), final, columns, result.intervals,
                       result.passes)
    seconds = result.seconds
    say(f"{result.images_per_second:.2f} images/s ({seconds['total']:.0f} s: reading and encoding "
        f"{seconds['read_and_encode']:.0f} s, TokenCut {seconds['tokencut']:.0f} s, bilateral {seconds['bilateral']:.0f} s)")
    write_json(out, result.to_dict())
    if figure is None and corrections and out is not None:
        figure = out.with_name(out.stem + "_masks.png")
    if figure is not None and result.examples and distributed.is_main():
        say(f"wrote {plot_mask_comparison(result.examples, figure)}")


def _open_splits(train, val, dataset, root, train_split, val_split, layout, ignore_index):
    """The training and evaluation splits of a segmentation job: explicit folders or --dataset/--root."""
    from ..data.images import DataFolderError
    from ..data.segmentation import SegmentationSplit

    if dataset is not None:
        from ..data.datasets import DEFAULT_SPLITS, open_segmentation

        splits = DEFAULT_SPLITS.get(dataset, ("train", "val"))
        opened = (open_segmentation(dataset, root, train_split or splits[0], ignore_index=ignore_index, what="--train"),
                  open_segmentation(dataset, root, val_split or splits[1], ignore_index=ignore_index, what="--val"))
    elif train is None or val is None:
        raise DataFolderError("--train and --val: pass both splits, or --dataset NAME --root DIR")
    else:
        opened = (SegmentationSplit.open(train, layout=layout, ignore_index=ignore_index, what="--train"),
                  SegmentationSplit.open(val, layout=layout, ignore_index=ignore_index, what="--val"))
    split = opened[1]
    say(f"layout {split.layout}: {split.num_classes} classes, label {split.ignore_index} ignored")
    return opened


def _split_sources(train, val, dataset, root) -> dict:
    """Where a segmentation job's splits came from, as its JSON settings record it."""
    return {"train": str(train) if train else None, "val": str(val) if val else None, "dataset": dataset,
            "root": str(root) if root else None}


@eval_app.command("knnseg")
def knnseg_command(
    model: ModelOpt,
    train: TrainSplitOpt = None,
    val: ValSplitOpt = None,
    dataset: SegDatasetOpt = None,
    root: RootOpt = None,
    train_split: TrainSplitNameOpt = None,
    val_split: ValSplitNameOpt = None,
    head: HeadOpt = None,
    variants: VariantsOpt = None,
    protocol: Annotated[str, typer.Option(help="hummingbird (soft-label bank, k=30, T=0.02) or capi (224 px, standardised tokens, k and cosine/L2 chosen on 10% of train, per-pixel mode; Darcet et al. 2025).")] = "hummingbird",
    k: Annotated[int, typer.Option(help="hummingbird: neighbours per query patch.")] = 30,
    temperature: Annotated[float, typer.Option(help="hummingbird: softmax temperature of the vote.")] = 0.02,
    hungarian: Annotated[bool, typer.Option("--hungarian", help="hummingbird: rename predicted classes by the Hungarian matching of the confusion matrix (open-hummingbird-eval's default; off here).")] = False,
    upsample: Annotated[str, typer.Option(help="hummingbird: upsampling of class scores, nearest or bilinear.")] = "nearest",
    image_size: Annotated[int | None, typer.Option(help="Shorter side at model input (default: the model's resolution; capi: the square side, 224).")] = None,
    max_bank: Annotated[int | None, typer.Option(help="Cap the memory bank at N patches (random sample).")] = None,
    memory_mb: Annotated[float, typer.Option(help="Memory for one similarity block.")] = 256.0,
    layout: LayoutOpt = "auto",
    ignore_index: IgnoreOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the bank sample.")] = 0,
    device: DeviceOpt = None,
    out: OutOpt = None,
    allow_other_backbone: AllowOtherOpt = False,
    threads: ThreadsOpt = 1,
) -> None:
    """Per-patch kNN semantic segmentation: mIoU, pixel accuracy, per-class IoU (percent)."""
    from ..eval.knnseg import KnnConfig, evaluate_knnseg

    set_threads(threads)
    config = KnnConfig(protocol=protocol, k=k, temperature=temperature, upsample=upsample, image_size=image_size,
                       max_bank=max_bank, memory_mb=memory_mb, batch_size=batch_size, seed=seed, hungarian=hungarian)
    train_data, val_data = _open_splits(train, val, dataset, root, train_split, val_split, layout, ignore_index)
    check_writable(out)
    backbone, corrections = corrections_for(model, head, variants, device, allow_other_backbone)
    with RichProgress() as progress:
        result = evaluate_knnseg(backbone, train_data, val_data, corrections=corrections, config=config,
                                 progress=progress)
    result.settings.update(head=str(head) if head else None, **_split_sources(train, val, dataset, root))
    print_log(result)
    if protocol == "capi":
        setting, columns = "capi protocol", [("miou", "mIoU"), ("acc", "pixel acc"), ("k", "k"), ("distance", "distance")]
    else:
        setting = f"hummingbird protocol, k={k}, T={temperature}" + (", Hungarian matching" if hungarian else "")
        columns = [("miou", "mIoU"), ("acc", "pixel acc")]
    print_side_by_side(f"kNN segmentation {train or train_data.layout} → {val or val_data.layout} — {model}, {setting}",
                       result.results, columns, result.intervals, result.passes)
    if len(result.results) > 1:
        table = Table(title="IoU per class")
        table.add_column("class")
        for variant in result.results:
            table.add_column(escape(variant), justify="right")
        for name in result.results["original"]["per_class_iou"]:
            table.add_row(escape(name), *(f"{r['per_class_iou'].get(name, float('nan')):.2f}"
                                          for r in result.results.values()))
        report.print(table)
    say(f"bank {result.bank_size} patches; {result.patches_per_second:.0f} query patches/s in the search; "
        f"{result.seconds['total']:.0f} s in all")
    write_json(out, result.to_dict())


@eval_app.command("linseg")
def linseg_command(
    model: ModelOpt,
    train: TrainSplitOpt = None,
    val: ValSplitOpt = None,
    dataset: SegDatasetOpt = None,
    root: RootOpt = None,
    train_split: TrainSplitNameOpt = None,
    val_split: ValSplitNameOpt = None,
    head: HeadOpt = None,
    variants: VariantsOpt = None,
    iterations: Annotated[int, typer.Option(help="Training iterations per variant.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per training iteration.")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (poly schedule, power 0.9).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    image_size: Annotated[int | None, typer.Option(help="Square side at model input (default: the model's resolution).")] = None,
    layout: LayoutOpt = "auto",
    ignore_index: IgnoreOpt = None,
    encode_batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the probe's initialisation and batch order.")] = 0,
    device: DeviceOpt = None,
    out: OutOpt = None,
    allow_other_backbone: AllowOtherOpt = False,
    threads: ThreadsOpt = 1,
) -> None:
    """Linear segmentation probe (BatchNorm + 1x1 conv on frozen last-block tokens; DINOv2's protocol scaled down): mIoU, pixel accuracy (percent)."""
    from ..eval.linear_seg import LinearSegConfig, evaluate_linear_seg

    set_threads(threads)
    config = LinearSegConfig(iterations=iterations, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             image_size=image_size, encode_batch_size=encode_batch_size, seed=seed)
    train_data, val_data = _open_splits(train, val, dataset, root, train_split, val_split, layout, ignore_index)
    check_writable(out)
    backbone, corrections = corrections_for(model, head, variants, device, allow_other_backbone)
    with RichProgress() as progress:
        result = evaluate_linear_seg(backbone, train_data, val_data, corrections=corrections, config=config,
                                     progress=progress)
    result.settings.update(head=str(head) if head else None, **_split_sources(train, val, dataset, root))
    print_log(result)
    print_side_by_side(f"Linear segmentation probe {train or train_data.layout} → {val or val_data.layout} — {model}, "
                       f"{iterations} iterations", result.results,
                       [("miou", "mIoU"), ("acc", "pixel acc"), ("first_loss", "first loss"), ("final_loss", "final loss")],
                       result.intervals, result.passes)
    seconds = result.seconds
    say(f"features {seconds['features']:.0f} s, training {seconds['train']:.0f} s, evaluation {seconds['eval']:.0f} s "
        f"({result.images_per_second:.2f} images/s)")
    write_json(out, result.to_dict())


@eval_app.command("warp")
def warp_command(
    model: ModelOpt,
    images: Annotated[Path, typer.Option(help="Real images (a folder or a file list), e.g. ../shared/data/imagenet-sample.")],
    head: HeadOpt = None,
    variants: VariantsOpt = None,
    warps: Annotated[str, typer.Option(help="Comma list of warps cycled over the images: crop, shift, flip, scale.")] = "crop,shift,flip,scale",
    image_size: Annotated[int | None, typer.Option(help="Side of the square views (default: the model's resolution).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the warp parameters.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Image pairs per forward pass.")] = 8,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most N images.")] = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    allow_other_backbone: AllowOtherOpt = False,
    threads: ThreadsOpt = 1,
) -> None:
    """Warp consistency: PCK@0.05/0.1 of patch matches across a known warp and the same-position rate (percent)."""
    from ..data.sources import open_images
    from ..eval.correspondence import WarpConfig, evaluate_warp

    set_threads(threads)
    config = WarpConfig(image_size=image_size, warps=tuple(w.strip() for w in warps.split(",") if w.strip()),
                        seed=seed, batch_size=batch_size)
    source = open_images(images, limit=limit)
    check_writable(out)
    backbone, corrections = corrections_for(model, head, variants, device, allow_other_backbone)
    with RichProgress() as progress:
        result = evaluate_warp(backbone, source, corrections=corrections, config=config, progress=progress)
    result.settings.update(head=str(head) if head else None, images=str(images))
    print_log(result)
    print_side_by_side(f"Warp consistency on {images} — {model}, {warps}", result.results,
                       [("pck@0.05", "PCK@0.05"), ("pck@0.1", "PCK@0.1"), ("same_position", "same position"),
                        ("n_images", "images")], result.intervals, result.passes)
    write_json(out, result.to_dict())
