"""``soapvit report``: one offline HTML page for one or more heads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import HTML_OUT, say


def head_labels(backbones: list[str], files: list[Path]) -> list[str]:
    """Each head's backbone id, with its file stem added where two heads share a backbone."""
    return [b if backbones.count(b) == 1 else f"{b} ({f.stem})" for b, f in zip(backbones, files)]


@app.command("report")
def report_command(
    heads: Annotated[list[Path], typer.Argument(help="One or more head files (several: compared side by side).")],
    out: Annotated[Path, typer.Option(help="HTML file to write."), HTML_OUT],
    evaluations: Annotated[list[Path] | None, typer.Option(
        "--eval", help="JSON written by soapvit eval tokencut|knnseg --out (repeatable).")] = None,
    images: Annotated[Path | None, typer.Option(
        help="Images for PCA-RGB token maps before/after each head (loads each head's backbone).")] = None,
    count: Annotated[int, typer.Option(help="Images to show with --images.")] = 3,
) -> None:
    """Write a self-contained HTML report: cards, SI per block, positional variance, removed
    components, token maps and evaluation tables."""
    from ..data.images import list_images
    from ..report import write_report
    from ..corrections.soap import SoapHead

    loaded = [SoapHead.load(h) for h in heads]
    labels = head_labels([h.metadata.get("backbone", p.stem) for h, p in zip(loaded, heads)], heads)
    files = list_images(images, count) if images is not None else []
    path = write_report(dict(zip(labels, loaded)), out, evaluations or [], files)
    say(f"wrote {path}")
