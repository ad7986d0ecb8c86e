"""``soapvit pretrain``: train a native ViT with one objective on labelled tar shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import SoapvitError
from ..validation import OPTIONAL_COUNT, Interval, validate
from . import app, console, report
from .common import DeviceOpt, Output, ThreadsOpt, set_threads


@app.command()
def pretrain(
    objective: Annotated[str, typer.Option(help="Training objective: mae, maskfeat, semanticmim (masked image "
                                                "modelling), supervised, dino or ibot (self-distillation).")],
    data: Annotated[Path, typer.Option(help="Folder of labelled tar shards '<split>-*.tar[.gz]' (KEY.jpg + KEY.cls "
                                            "per image), e.g. ../shared/data/tiny-imagenet.")],
    out: Annotated[Path, typer.Option(help="Training checkpoint to write (.pt), every few minutes and at the end."),
                   Output((".pt",), "a checkpoint", updates=("resume",))],
    epochs: Annotated[float, typer.Option(help="Length of the schedule in epochs (may be fractional).")] = 1.0,
    resume: Annotated[Path | None, typer.Option(
        help="Checkpoint to continue with the recipe it holds (schedule, batch size, learning rate, seed, "
             "architecture: those options are ignored); --objective must match it.")] = None,
    export: Annotated[Path | None, typer.Option(help="Also write the encoder as a zoo model file (.safetensors, fp16)."),
                      Output((".safetensors",), "a model file")] = None,
    split: Annotated[str, typer.Option(help="Shard split to train on.")] = "train",
    limit: Annotated[int | None, typer.Option(help="Use the first N images of the split.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per training step.")] = 64,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 1e-3; 5e-4 for dino and ibot).")] = None,
    image_size: Annotated[int, typer.Option(help="Square input size of the ViT (a multiple of --patch-size).")] = 64,
    patch_size: Annotated[int, typer.Option(help="Patch side of the ViT in pixels.")] = 8,
    embed_dim: Annotated[int, typer.Option(help="Token width of the ViT (a multiple of --num-heads).")] = 96,
    depth: Annotated[int, typer.Option(help="Number of transformer blocks.")] = 6,
    num_heads: Annotated[int, typer.Option(help="Attention heads per block.")] = 3,
    max_minutes: Annotated[float | None, typer.Option(
        help="Stop this run after N minutes (continue it with --resume).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop this run after N steps (continue it with --resume).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order, augmentations and masks.")] = 0,
    device: DeviceOpt = None,
    threads: ThreadsOpt = 1,
) -> None:
    """Pre-train a ViT with one objective on labelled tar shards, or continue a checkpoint
    (--resume); the checkpoint is saved every few minutes and at the end."""
    from ..data.shards import load_labelled_shards
    from ..features import resolve_device
    from ..pretrain import TrainConfig, export_backbone, load_checkpoint, train

    vit = {"image_size": image_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
           "num_heads": num_heads}
    config = TrainConfig(objective, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, vit=vit)
    validate({"max_minutes": max_minutes, "max_steps": max_steps},
             {"max_minutes": Interval(float, 0, open_low=True, optional=True), "max_steps": OPTIONAL_COUNT})
    if resume is not None:
        saved = load_checkpoint(resume)  # a bad checkpoint fails before the data is decoded
        trained = saved["train_config"].get("objective")
        if trained != objective:
            raise SoapvitError(f"--resume {resume} is a {trained} checkpoint, not {objective}: give --objective "
                               f"{trained} to continue it")
    dev = resolve_device(device)
    if dev.type == "cpu":
        set_threads(threads)
    images, labels = load_labelled_shards(data, split, limit=limit)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(objective, total=None, info="")

        def log(state) -> None:
            bar.update(task, total=state.total_steps, completed=state.step,
                       info=f"loss {state.loss:.4f} lr {state.lr:.1e} {state.images_per_s:.0f} img/s")

        result = train(config, images, labels, out, resume=resume, device=dev,
                       max_seconds=None if max_minutes is None else max_minutes * 60, max_steps=max_steps, log=log)
    status = "finished" if result.finished else "paused (resume with --resume)"
    report.print(escape(f"{out}: step {result.step}/{result.total_steps} {status}, "
                        f"loss {result.final_loss:.4f}, {result.elapsed_s:.0f} s"), highlight=False, soft_wrap=True)
    if export is not None:
        report.print(escape(f"exported {export_backbone(out, export)}"), highlight=False, soft_wrap=True)
