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
from .common import Output, ThreadsOpt, set_threads


@app.command()
def pretrain(
    objective: Annotated[str, typer.Option(help="mae | maskfeat | semanticmim | supervised | dino | ibot")],
    data: Annotated[Path, typer.Option(help="folder of '<split>-*.tar[.gz]' shards (KEY.jpg + KEY.cls)")],
    out: Annotated[Path, typer.Option(help="training checkpoint to write (.pt)"), Output((".pt",), "a checkpoint", updates=("resume",))],
    epochs: Annotated[float, typer.Option(help="length of the schedule (may be fractional)")] = 1.0,
    resume: Annotated[Path | None, typer.Option(help="continue this checkpoint (its recipe wins)")] = None,
    export: Annotated[Path | None, typer.Option(help="also write the encoder as fp16 zoo .safetensors"),
                      Output((".safetensors",), "a model file")] = None,
    split: Annotated[str, typer.Option(help="shard split to train on")] = "train",
    limit: Annotated[int | None, typer.Option(help="use only the first N images")] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    lr: Annotated[float | None, typer.Option(help="peak learning rate (default per objective)")] = None,
    image_size: Annotated[int, typer.Option()] = 64,
    patch_size: Annotated[int, typer.Option()] = 8,
    embed_dim: Annotated[int, typer.Option()] = 96,
    depth: Annotated[int, typer.Option()] = 6,
    num_heads: Annotated[int, typer.Option()] = 3,
    max_minutes: Annotated[float | None, typer.Option(help="stop this call after N minutes (resume later)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop this call after N steps (resume later)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: CUDA if available)")] = None,
    threads: ThreadsOpt = 1,
) -> None:
    """Pre-train (or resume) a ViT; checkpoints every few minutes and at the end."""
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
