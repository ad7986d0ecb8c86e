"""``soapvit eval tokencut`` and ``soapvit eval knnseg``: every variant of a corrections file beside
the original tokens, with paired intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from . import eval_app, report
from .common import (AllowOtherOpt, DeviceOpt, HeadOpt, ModelOpt, OutOpt, RichProgress, ThreadsOpt, VariantsOpt,
                     check_writable, corrections_for, print_log, print_side_by_side, say, set_threads, write_json)


@eval_app.command("tokencut")
def tokencut_command(
    model: ModelOpt,
    images: Annotated[Path, typer.Option(help="Folder of images (ECSSD, DUTS-TE, DUT-OMRON …).")],
    masks: Annotated[Path | None, typer.Option(help="Folder of masks matched by stem (default: a sibling masks/, gt/ … folder).")] = None,
    head: HeadOpt = None,
    variants: VariantsOpt = None,
    features: Annotated[str, typer.Option(help="tokens (final-norm output tokens, SOAP's evaluation) or keys (last-block keys, TokenCut).")] = "tokens",
    tau: Annotated[float | None, typer.Option(help="Affinity threshold τ (default 0.3 for tokens, 0.2 for keys).")] = None,
    eps: Annotated[float, typer.Option(help="Weight of non-edges.")] = 1e-5,
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
    """TokenCut salient-object segmentation: maxFβ, IoU, accuracy (percent)."""
    from .. import distributed
    from ..data.saliency import SaliencyDataset
    from ..eval.salient import TokenCutConfig, evaluate_tokencut
    from ..plots import plot_mask_comparison

    set_threads(threads)
    config = TokenCutConfig(features=features, tau=tau, eps=eps, bilateral=bilateral, resize=resize,
                            image_size=image_size, resample=resample, solver=solver, batch_size=batch_size)
    dataset = SaliencyDataset.from_folders(images, masks, limit=limit)
    for path in (out, figure):
        check_writable(path)
    backbone, corrections = corrections_for(model, head, variants, device, allow_other_backbone)
    with RichProgress() as progress:
        result = evaluate_tokencut(backbone, dataset, corrections=corrections, config=config, save_masks=save_masks,
                                   progress=progress)
    result.settings.update(head=str(head) if head else None, images=str(images))
    print_log(result)
    columns = [("maxFbeta", "maxFβ"), ("iou", "IoU"), ("acc", "Acc"), ("n_images", "images")]
    name = f"TokenCut on {images} — {model}, {features}, τ={config.tau}"
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


@eval_app.command("knnseg")
def knnseg_command(
    model: ModelOpt,
    train: Annotated[Path, typer.Option(help="Training split: images/+labels/ folder, ADE20K images/<split>, or VOC ImageSets/Segmentation/<split>.txt.")],
    val: Annotated[Path, typer.Option(help="Evaluation split, same layouts.")],
    head: HeadOpt = None,
    variants: VariantsOpt = None,
    k: Annotated[int, typer.Option(help="Neighbours per query patch.")] = 30,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the vote.")] = 0.02,
    upsample: Annotated[str, typer.Option(help="Upsampling of class scores: nearest or bilinear.")] = "nearest",
    image_size: Annotated[int | None, typer.Option(help="Shorter side at model input (default: the model's resolution).")] = None,
    max_bank: Annotated[int | None, typer.Option(help="Cap the memory bank at N patches (random sample).")] = None,
    memory_mb: Annotated[float, typer.Option(help="Memory for one similarity block.")] = 256.0,
    layout: Annotated[str, typer.Option(help="auto, camvid, folder, ade20k or voc.")] = "auto",
    ignore_index: Annotated[int | None, typer.Option(help="Label to ignore (default: the layout's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the bank sample.")] = 0,
    device: DeviceOpt = None,
    out: OutOpt = None,
    allow_other_backbone: AllowOtherOpt = False,
    threads: ThreadsOpt = 1,
) -> None:
    """Per-patch kNN semantic segmentation: mIoU, pixel accuracy, per-class IoU (percent)."""
    from ..data.segmentation import SegmentationSplit
    from ..eval.knnseg import KnnConfig, evaluate_knnseg

    set_threads(threads)
    config = KnnConfig(k=k, temperature=temperature, upsample=upsample, image_size=image_size, max_bank=max_bank,
                       memory_mb=memory_mb, batch_size=batch_size, seed=seed)
    train_split = SegmentationSplit.open(train, layout=layout, ignore_index=ignore_index, what="--train")
    val_split = SegmentationSplit.open(val, layout=layout, ignore_index=ignore_index, what="--val")
    check_writable(out)
    backbone, corrections = corrections_for(model, head, variants, device, allow_other_backbone)
    with RichProgress() as progress:
        result = evaluate_knnseg(backbone, train_split, val_split, corrections=corrections, config=config,
                                 progress=progress)
    result.settings.update(head=str(head) if head else None, train=str(train), val=str(val))
    print_log(result)
    print_side_by_side(f"kNN segmentation {train} → {val} — {model}, k={k}, T={temperature}", result.results,
                       [("miou", "mIoU"), ("acc", "pixel acc")], result.intervals, result.passes)
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
