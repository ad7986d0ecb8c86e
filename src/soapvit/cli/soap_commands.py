"""``soapvit fit``, ``inspect``, ``plot`` and ``demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import SoapvitError
from . import app, report
from .common import (FOLDER_OUT, HEAD_OUT, BlocksOpt, DeviceOpt, ModelOpt, RichProgress, ThreadsOpt, check_writable, load_backbone,
                     parse_blocks, parse_int_list, print_log, say, set_threads)

DEMO_MODEL = "zoo:dinov2-s14-imgfocus"


def parse_mu(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise SoapvitError(f"--mu must be a number or 'auto', not {value!r}") from None


def run_fit(model: str, images: Path, out: Path, *, limit=None, synthetic=None, blocks="all", apply_block=-1,
            image_size=None, batch_size=32, device=None, seed=0, variant="reference", weighting=None,
            mu="2", tau=0.05, remove="", generator="mixture", cache_gb=8.0, block_features="residual",
            final_norm="last", threads=None, checkpoint=None, checkpoint_every=100, methods="soap", calibration_images=256, precision="bf16"):
    """Check every argument, then load, fit, save; returns ``(backbone, corrections, report)``.

    ``remove`` lists principal components by their 1-based number (``PC3`` → 3), as ``inspect``
    prints them. Under torchrun every rank fits its share; rank 0 writes the head."""
    from .. import distributed
    from ..backbones.base import EDITED_TOKENS
    from ..data.sources import open_images
    from ..corrections import SoapConfig
    from ..fitting import FIT_CONSTRAINTS, fit, resolve_methods
    from ..validation import Options, validate

    if threads is not None:
        set_threads(threads)
    norms = {"last": EDITED_TOKENS, "all": True}  # --final-norm → the fit's norm
    validate({"final_norm": final_norm}, {"final_norm": Options(tuple(norms))})
    validate({"limit": limit, "synthetic": synthetic, "image_size": image_size, "batch_size": batch_size,
              "cache_gb": cache_gb, "generator": generator, "seed": seed, "block_features": block_features,
              "checkpoint_every": checkpoint_every, "calibration_images": calibration_images,
              "precision": precision}, FIT_CONSTRAINTS)
    method_names = resolve_methods(methods)
    pcs = parse_int_list(remove, "--remove")
    if any(pc < 1 for pc in pcs):
        raise SoapvitError(f"--remove lists principal components from 1 (PC1 = largest variance), not {remove!r}")
    config = SoapConfig(variant=variant, weighting=weighting, mu=parse_mu(mu), tau=tau, remove=[pc - 1 for pc in pcs])
    block_selection = parse_blocks(blocks)
    check_writable(out)
    source = open_images(images, limit)  # check the folder, list or shards before loading a model
    backbone = load_backbone(model, device)
    if image_size is not None and image_size < 2 * backbone.patch_size:
        raise SoapvitError(f"--image-size {image_size} gives fewer than 2x2 patches of {backbone.patch_size} px")
    backbone.resolve_blocks(block_selection)
    backbone.resolve_blocks(apply_block)
    if pcs and max(pcs) > backbone.embed_dim:
        raise SoapvitError(f"--remove {max(pcs)}: {model} has {backbone.embed_dim} components (PC1 to "
                           f"PC{backbone.embed_dim})")
    with RichProgress() as progress:
        corrections, result = fit(backbone, source, synthetic=synthetic, generator=generator, blocks=block_selection,
                                  apply_block=apply_block, image_size=image_size, batch_size=batch_size,
                                  device=backbone.device, seed=seed, config=config,
                                  methods="all" if methods == "all" else method_names,
                                  calibration_images=calibration_images, cache_gb=cache_gb,
                                  block_features=block_features, norm=norms[final_norm], precision=precision,
                                  checkpoint=checkpoint,
                                  checkpoint_every=checkpoint_every, progress=progress)
    if distributed.is_main():
        corrections.save(out)
    return backbone, corrections, result


@app.command("fit")
def fit_command(
    model: ModelOpt,
    images: Annotated[Path, typer.Option(help="Natural images: a folder (subfolders included), a text file "
                                              "listing image paths, or tar shards ('train-{000..099}.tar').")],
    out: Annotated[Path, typer.Option(help="Head file to write (.safetensors)."), HEAD_OUT],
    limit: Annotated[int | None, typer.Option(help="Use at most N images.")] = None,
    synthetic: Annotated[int | None, typer.Option(help="Synthetic images (default: as many as real).")] = None,
    blocks: BlocksOpt = "all",
    apply_block: Annotated[int, typer.Option("--apply-block", "--apply-layer",
                                             help="Block the projector applies to (0-based, negative from the end).")] = -1,
    image_size: Annotated[int | None, typer.Option(help="Square input size (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: DeviceOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic images.")] = 0,
    variant: Annotated[str, typer.Option(help="reference (authors' code) or paper (project page).")] = "reference",
    weighting: Annotated[str | None, typer.Option(help="reference, paper, si or manual (default: the variant).")] = None,
    mu: Annotated[str, typer.Option(help="Cut-off μ, or 'auto' (= number of components with SI ≥ 0.75).")] = "2",
    tau: Annotated[float, typer.Option(help="Sigmoid temperature τ.")] = 0.05,
    remove: Annotated[str, typer.Option(help="Manual truncation: comma list of principal components to remove, "
                                             "numbered from 1 as inspect prints them (PC3 → 3).")] = "",
    generator: Annotated[str, typer.Option(help="Synthetic generator: mixture, marginal, pink, modulated, gradient.")] = "mixture",
    cache_gb: Annotated[float, typer.Option(help="Memory for caching real tokens between passes.")] = 8.0,
    block_features: Annotated[str, typer.Option(
        help="residual (each block's output, final norm applied) or branch (the MLP-branch output the SOAP "
             "authors hook for their depth sweep).")] = "residual",
    final_norm: Annotated[str, typer.Option(
        help="Blocks whose tokens take the model's final norm: last (each block as a correction there edits it: "
             "the output at the last block, the residual stream at an earlier one) or all (DINOv2's "
             "intermediate-layer convention, for depth studies).")] = "last",
    threads: ThreadsOpt = 1,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Folder for resumable state: rerunning the same command continues from it."), FOLDER_OUT] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Save the state every N batches.")] = 100,
    methods: Annotated[str, typer.Option(
        help="Corrections to fit from the same passes: all, or a comma list of soap, posmean, blank, zero-subspace, "
             "top-pc, position-pc, high-norm, registers.")] = "soap",
    calibration_images: Annotated[int, typer.Option(
        help="Real images of the calibration pass of a method that needs one (registers).")] = 256,
    precision: Annotated[str, typer.Option(
        help="bf16 (autocast on a GPU) or fp32 (no autocast); the CPU always runs float32.")] = "bf16",
) -> None:
    """Fit a SOAP head (and, with --methods, its alternatives): PCA of patch tokens, SI scores,
    projector (torchrun: on several processes)."""
    _, corrections, result = run_fit(model, images, out, limit=limit, synthetic=synthetic, blocks=blocks,
                              apply_block=apply_block, image_size=image_size, batch_size=batch_size,
                              device=device, seed=seed, variant=variant, weighting=weighting, mu=mu, tau=tau,
                              remove=remove, generator=generator, cache_gb=cache_gb, block_features=block_features,
                              final_norm=final_norm, threads=threads, checkpoint=checkpoint,
                              checkpoint_every=checkpoint_every, methods=methods,
                              calibration_images=calibration_images, precision=precision)
    print_log(result)
    head = corrections.soap
    say(f"fitted {len(head.blocks)} block(s) on {result.n_real} real + {result.n_synthetic} synthetic "
        f"images in {result.seconds['total']:.1f} s ({result.images_per_second:.1f} images/s) → {out}")
    say(f"corrections in the file: {', '.join(corrections)}")
    print_findings(head)


def print_findings(head) -> None:
    """Per block: max SI, how many components have high SI, which ones the head removes."""
    from ..corrections.soap import REMOVED_WEIGHT, SI_THRESHOLD, high_si, removed

    table = Table(title=escape(f"semantic invariance — {head.metadata.get('backbone', '')}"))
    for col in ("block", "max SI", "at PC", "its variance from position", f"# SI ≥ {SI_THRESHOLD}",
                f"removed (weight > {REMOVED_WEIGHT})"):
        table.add_column(col, justify="right")
    below = False
    for b, d in sorted(head.blocks.items()):
        top = int(d.si.argmax())
        cut = [f"PC{c + 1}:{d.weights[c]:.2f}" + ("*" if d.si[c] < SI_THRESHOLD else "") for c in removed(d.weights)]
        below |= any(c.endswith("*") for c in cut)
        marker = " ←" if b == head.apply_block else ""
        table.add_row(f"{b}{marker}", f"{d.si.max():.3f}", f"PC{top + 1}", f"{d.position_share[top]:.0%}",
                      str(high_si(d.si).numel()), " ".join(cut) or "-")
    if below:
        table.caption = (f"* removed with SI below {SI_THRESHOLD} (about 0.71 is what a component responding at "
                         "random gives): the rank cut-off μ removes it; the SI test does not call it non-semantic")
    report.print(table)


@app.command("inspect")
def inspect_command(
    head_file: Annotated[Path, typer.Argument(help="Corrections file written by soapvit fit.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print eigenvalues, SI and weights as JSON.")] = False,
) -> None:
    """Per block, the SI and weight of every component in descending-eigenvalue order, and every
    correction the file holds."""
    from ..corrections import CorrectionSet

    corrections = CorrectionSet.load(head_file)
    head = corrections.soap
    described = {name: c.describe() for name, c in corrections.items() if name != "soap"}
    if as_json:
        typer.echo(json.dumps({**head.summary(), "corrections": described}))
        return
    meta = head.metadata
    report.print(escape(f"backbone {meta.get('backbone')} · variant {meta.get('variant')} · weighting "
                  f"{meta.get('weighting')} · μ {meta.get('mu')} · τ {meta.get('tau')} · {meta.get('n_real')} real / "
                  f"{meta.get('n_synthetic')} synthetic images at {meta.get('image_size')} px · applies to block "
                  f"{head.apply_block}"), highlight=False)
    print_findings(head)
    from ..plots import NULL_DIRECTION, null_components

    for b, d in sorted(head.blocks.items()):
        null = null_components(d)
        cells = " ".join(f"PC{c + 1} " + (f"– ({NULL_DIRECTION}: no variance, SI undefined)" if c in null else
                                          f"{s:.2f}" + (f" (w {w:.2f})" if w > 0.005 else ""))
                         for c, (s, w) in enumerate(zip(d.si.tolist(), d.weights.tolist())))
        report.print(f"[bold]block {b}[/] SI and weight w (shown when > 0.005) by component: {escape(cells)}",
                     highlight=False, soft_wrap=True)
    for name, d in described.items():
        params = ", ".join(f"{k}={v}" for k, v in d["params"].items())
        report.print(escape(f"correction {name}: {d['method']} at block {d['block']} ({params or 'no parameters'})"),
                     highlight=False, soft_wrap=True)


@app.command("plot")
def plot_command(
    heads: Annotated[list[Path], typer.Argument(help="One or more head files (several: curves compared).")],
    out: Annotated[Path, typer.Option(help="Folder for the figures."), FOLDER_OUT],
    images: Annotated[Path | None, typer.Option(help="Images for PCA and component maps (first head).")] = None,
    count: Annotated[int, typer.Option(help="Images to show.")] = 4,
    dashed: Annotated[str, typer.Option(help="Comma list of backbone ids drawn dashed (non-MIM).")] = "",
    device: DeviceOpt = None,
) -> None:
    """SI curves, max SI per block, response maps, and PCA/component maps before and after."""
    from ..data.images import list_images
    from ..plots import plot_max_si_per_block, plot_si_curves, render_head_figures
    from ..corrections.soap import SoapHead

    loaded = [SoapHead.load(h) for h in heads]
    labels = [h.metadata.get("backbone", p.stem) for h, p in zip(loaded, heads)]
    labels = [lab if labels.count(lab) == 1 else f"{lab} ({p.stem})" for lab, p in zip(labels, heads)]
    backbone = files = None
    if images is not None:
        files = list_images(images, count)
        backbone = load_backbone(loaded[0].metadata["backbone"], device)
    paths = render_head_figures(loaded[0], out, backbone, files or (), label=labels[0])
    if len(loaded) > 1:
        by_label = dict(zip(labels, loaded))
        dashed_ids = [d for d in dashed.split(",") if d]
        dashed_labels = [lab for lab, h in by_label.items() if h.metadata.get("backbone") in dashed_ids]
        paths += [plot_si_curves(by_label, out / "si_sorted_compare.png", dashed_labels),
                  plot_max_si_per_block(by_label, out / "max_si_per_block_compare.png", dashed_labels)]
    for p in paths:
        say(f"wrote {p}")


def sample_images_folder() -> Path:
    """The small image sample shipped with the package (48 ImageNet images, 224 px)."""
    return Path(__file__).resolve().parent.parent / "assets" / "sample_images"


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for the head and figures."), FOLDER_OUT] = Path("soapvit-demo"),
    model: Annotated[str, typer.Option(help="Backbone id.")] = DEMO_MODEL,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    threads: ThreadsOpt = 1,
) -> None:
    """Offline demo: fit SOAP on the bundled sample for every block, explain, plot, and write the
    HTML report."""
    from ..plots import render_head_figures
    from ..report import write_report

    images = sample_images_folder()
    head_path = out / "head.safetensors"
    say(f"soapvit demo: {model} on {len(list(images.glob('*.jpg')))} bundled ImageNet images and as many synthetic "
        "non-semantic images")
    from ..corrections.soap import SI_THRESHOLD, high_si, removed

    backbone, corrections, result = run_fit(model, images, head_path, batch_size=batch_size, device=device,
                                            threads=threads)
    head = corrections.soap
    say(f"fitted {len(head.blocks)} blocks in {result.seconds['total']:.0f} s → {head_path}")
    print_findings(head)
    d = head.blocks[head.apply_block]
    high = high_si(d.si).tolist()
    say(f"Last block: {len(high)} component(s) with SI ≥ {SI_THRESHOLD} "
        f"({', '.join(f'PC{c + 1} SI {d.si[c]:.3f}, {d.position_share[c]:.0%} of its variance from position' for c in high) or 'none'}). "
        "They respond alike on real and on synthetic images, i.e. they carry no semantics; "
        f"the head removes {', '.join(f'PC{c + 1}' for c in removed(d.weights)) or 'nothing'}.")
    for p in render_head_figures(head, out, backbone, sorted(images.glob("*.jpg"))[:4]):
        say(f"wrote {p}")
    page = write_report({model: head}, out / "report.html", images=sorted(images.glob("*.jpg"))[:3],
                        backbones={model: backbone})
    say(f"wrote {page}: open it in a browser")
