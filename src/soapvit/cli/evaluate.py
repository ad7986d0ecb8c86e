"""``soapvit eval tokencut`` and ``soapvit eval knnseg``: original and SOAP side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import SoapvitError
from . import console, eval_app, report
from .soap_commands import RichProgress

ModelOpt = Annotated[str, typer.Option(help="Backbone id: hf:<repo|dir>, timm:<name>, zoo:<name>.")]
HeadOpt = Annotated[Path | None, typer.Option(help="SOAP head file: also evaluate corrected tokens (same forward pass).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (default: auto).")]
OutOpt = Annotated[Path | None, typer.Option(help="Write the results as JSON here.")]


def load_backbone_and_head(model: str, head_path: Path | None, device: str | None):
    from ..backbones import load
    from ..features import resolve_device
    from ..soap import SoapHead

    head = SoapHead.load(head_path) if head_path is not None else None
    backbone = load(model, device=str(resolve_device(device)))
    if head is not None and head.projector.shape[0] != backbone.embed_dim:
        raise SoapvitError(f"--head {head_path} has dimension {head.projector.shape[0]}, {model} has {backbone.embed_dim}")
    return backbone, head


def print_side_by_side(title: str, results: dict[str, dict], columns: list[tuple[str, str]]) -> None:
    table = Table(title=title)
    table.add_column("tokens")
    for _, label in columns:
        table.add_column(label, justify="right")
    for variant, res in results.items():
        table.add_row(variant, *(f"{res[key]:.2f}" if isinstance(res[key], float) else str(res[key]) for key, _ in columns))
    if "original" in results and "soap" in results:
        table.add_row("Δ (SOAP − original)", *(
            f"{results['soap'][k] - results['original'][k]:+.2f}" if isinstance(results["original"][k], float) else ""
            for k, _ in columns))
    report.print(table)


def print_problems(skipped: list[str], warnings: list[str]) -> None:
    for note in warnings:
        console.print(f"[yellow]warning:[/] {note}", highlight=False, soft_wrap=True)
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} image(s):[/]", highlight=False)
        for line in skipped[:10]:
            console.print(f"  {line}", highlight=False, soft_wrap=True)
        if len(skipped) > 10:
            console.print(f"  … and {len(skipped) - 10} more (all listed in the JSON)")


def write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        console.print(f"wrote {path}")


@eval_app.command("tokencut")
def tokencut_command(
    model: ModelOpt,
    images: Annotated[Path, typer.Option(help="Folder of images (ECSSD, DUTS-TE, DUT-OMRON …).")],
    masks: Annotated[Path | None, typer.Option(help="Folder of masks matched by stem (default: a sibling masks/, gt/ … folder).")] = None,
    head: HeadOpt = None,
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
    save_masks: Annotated[Path | None, typer.Option(help="Save the scored masks as PNG named by image stem (SOAP in soap/).")] = None,
    figure: Annotated[Path | None, typer.Option(help="Comparison figure (default with --head and --out: next to the JSON).")] = None,
) -> None:
    """TokenCut salient-object segmentation: maxFβ, IoU, accuracy (percent)."""
    from ..data.saliency import SaliencyDataset
    from ..eval.salient import TokenCutSettings, evaluate_tokencut

    dataset = SaliencyDataset.from_folders(images, masks, limit=limit)
    settings = TokenCutSettings(features=features, tau=tau, eps=eps, bilateral=bilateral, resize=resize,
                                image_size=image_size, resample=resample, solver=solver, batch_size=batch_size)
    backbone, soap_head = load_backbone_and_head(model, head, device)
    with RichProgress() as progress:
        result = evaluate_tokencut(backbone, dataset, head=soap_head, settings=settings, save_masks=save_masks,
                                   progress=progress)
    variants = {v: r for v, r in result.results.items() if "/" not in v}
    payload = dict(variants["original"])
    if "soap" in variants:
        payload["soap"] = variants["soap"]
    if settings.bilateral:
        payload["without_bilateral"] = {v.split("/")[0]: r for v, r in result.results.items() if "/" in v}
    payload.update(settings={**result.settings, "head": str(head) if head else None, "images": str(images)},
                   images_per_second=result.images_per_second, seconds=result.seconds, skipped=result.skipped,
                   warnings=result.warnings)
    print_problems(result.skipped, result.warnings)
    columns = [("maxFbeta", "maxFβ"), ("iou", "IoU"), ("acc", "Acc"), ("n_images", "images")]
    name = f"TokenCut on {images} — {model}, {features}, τ={settings.tau}"
    if settings.bilateral:
        print_side_by_side(name + ", no solver", payload["without_bilateral"], columns)
    print_side_by_side(name + (", bilateral solver" if settings.bilateral else ""), variants, columns)
    console.print(f"{result.images_per_second:.2f} images/s ({result.seconds['total']:.0f} s: forward "
                  f"{result.seconds['forward']:.0f} s, TokenCut {result.seconds['tokencut']:.0f} s, bilateral "
                  f"{result.seconds['bilateral']:.0f} s)")
    write_json(out, payload)
    if figure is None and soap_head is not None and out is not None:
        figure = out.with_name(out.stem + "_masks.png")
    if figure is not None and result.examples:
        from ..eval.figures import plot_mask_comparison

        console.print(f"wrote {plot_mask_comparison(result.examples, figure)}")


@eval_app.command("knnseg")
def knnseg_command(
    model: ModelOpt,
    train: Annotated[Path, typer.Option(help="Training split: images/+labels/ folder, ADE20K images/<split>, or VOC ImageSets/Segmentation/<split>.txt.")],
    val: Annotated[Path, typer.Option(help="Evaluation split, same layouts.")],
    head: HeadOpt = None,
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
) -> None:
    """Per-patch kNN semantic segmentation: mIoU, pixel accuracy, per-class IoU (percent)."""
    from ..data.segmentation import SegmentationSplit
    from ..eval.knnseg import KnnSettings, evaluate_knnseg

    train_split = SegmentationSplit.open(train, layout=layout, ignore_index=ignore_index, what="--train")
    val_split = SegmentationSplit.open(val, layout=layout, ignore_index=ignore_index, what="--val")
    settings = KnnSettings(k=k, temperature=temperature, upsample=upsample, image_size=image_size, max_bank=max_bank,
                           memory_mb=memory_mb, batch_size=batch_size, seed=seed)
    backbone, soap_head = load_backbone_and_head(model, head, device)
    with RichProgress() as progress:
        result = evaluate_knnseg(backbone, train_split, val_split, head=soap_head, settings=settings, progress=progress)
    payload = dict(result.results["original"])
    if "soap" in result.results:
        payload["soap"] = result.results["soap"]
    payload.update(settings={**result.settings, "head": str(head) if head else None, "train": str(train),
                             "val": str(val)},
                   bank_size=result.bank_size, patches_per_second=result.patches_per_second, seconds=result.seconds,
                   skipped=result.skipped, warnings=result.warnings)
    print_problems(result.skipped, result.warnings)
    print_side_by_side(f"kNN segmentation {train} → {val} — {model}, k={k}, T={temperature}", result.results,
                       [("miou", "mIoU"), ("acc", "pixel acc")])
    if "soap" in result.results:
        table = Table(title="IoU per class")
        table.add_column("class")
        for col in ("original", "SOAP", "Δ"):
            table.add_column(col, justify="right")
        for name, value in result.results["original"]["per_class_iou"].items():
            soap = result.results["soap"]["per_class_iou"].get(name, float("nan"))
            table.add_row(name, f"{value:.2f}", f"{soap:.2f}", f"{soap - value:+.2f}")
        report.print(table)
    console.print(f"bank {result.bank_size} patches; {result.patches_per_second:.0f} query patches/s in the search; "
                  f"{result.seconds['total']:.0f} s in all")
    write_json(out, payload)
