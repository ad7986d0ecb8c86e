"""``soapvit eval artifacts``: how much positional and high-norm signal each variant carries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from . import eval_app, report
from .common import (AllowOtherOpt, DeviceOpt, HeadOpt, ModelOpt, OutOpt, RichProgress, ThreadsOpt, VariantsOpt,
                     check_writable, corrections_for, print_log, set_threads, write_json)

COLUMNS = (("position_probe_acc", "position probe acc"), ("cos_same_position", "cos same pos."),
           ("cos_other_position", "cos other pos."), ("high_norm_share", "high-norm share"),
           ("effective_rank", "effective rank"))


@eval_app.command("artifacts")
def artifacts_command(
    model: ModelOpt,
    images: Annotated[Path, typer.Option(help="Natural images: a folder, a file list or tar shards.")],
    head: HeadOpt = None,
    variants: VariantsOpt = None,
    limit: Annotated[int, typer.Option(help="Images to measure (half train the position probe).")] = 200,
    image_size: Annotated[int | None, typer.Option(help="Square input size (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    device: DeviceOpt = None,
    out: OutOpt = None,
    allow_other_backbone: AllowOtherOpt = False,
    threads: ThreadsOpt = 1,
) -> None:
    """Per variant: position-probe accuracy, same- vs other-position cosine, high-norm share, effective rank."""
    from ..data.sources import open_images
    from ..eval.artifacts import measure_artifacts
    from ..validation import COUNT, validate

    set_threads(threads)
    validate({"limit": limit, "batch_size": batch_size}, {"limit": COUNT, "batch_size": COUNT})
    source = open_images(images, limit)
    check_writable(out)
    backbone, corrections = corrections_for(model, head, variants, device, allow_other_backbone)
    with RichProgress() as progress:
        result = measure_artifacts(backbone, source, corrections=corrections, image_size=image_size,
                                   batch_size=batch_size, progress=progress)
    print_log(result)
    grid = result.settings["grid"]
    table = Table(title=escape(f"artifacts of {model}, last block, {result.settings['n_images']} images, grid "
                               f"{grid[0]}x{grid[1]} (probe chance {1 / (grid[0] * grid[1]):.4f})"))
    table.add_column("variant")
    for _, label in COLUMNS:
        table.add_column(label, justify="right")
    for name, row in result.results.items():
        table.add_row(escape(name), *(f"{row[key]:.4f}" if key != "effective_rank" else f"{row[key]:.1f}"
                                      for key, _ in COLUMNS))
    report.print(table)
    write_json(out, result.to_dict())
