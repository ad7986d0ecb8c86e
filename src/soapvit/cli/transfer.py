"""``soapvit extract``, ``export`` and ``push``: corrected features that leave soapvit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import SoapvitError
from . import app
from .common import (AllowOtherOpt, BlocksOpt, DeviceOpt, HeadOpt, ModelOpt, RichProgress, ThreadsOpt, VariantsOpt,
                     check_writable, corrections_for, parse_blocks, say, set_threads)


def head_description(head) -> dict:
    """The head as the manifest records it: its spec and, for a file, its sha256."""
    if head is None:
        return {"head": None}
    from ..extract import file_digest

    path = Path(head)
    if str(head).startswith("hf:"):
        from ..hub import resolve_head

        path = resolve_head(str(head))
    return {"head": {"spec": str(head), "sha256": file_digest(path)}}


@app.command("extract")
def extract_command(
    model: ModelOpt,
    images: Annotated[Path, typer.Option(help="A folder (subfolders included), a text file listing image paths, "
                                              "or tar shards ('train-{000..099}.tar').")],
    out: Annotated[Path, typer.Option(help="Folder for the shards, index.json and manifest.json.")],
    head: HeadOpt = None,
    variants: VariantsOpt = None,
    blocks: BlocksOpt = "last",
    prefix: Annotated[bool, typer.Option("--prefix", help="Also write the prefix tokens (CLS, registers).")] = False,
    dtype: Annotated[str, typer.Option(help="fp16 or fp32.")] = "fp16",
    shard_mb: Annotated[float, typer.Option(help="Largest shard size in MiB.")] = 256.0,
    image_size: Annotated[int | None, typer.Option(help="Square input size (default: the model's).")] = None,
    limit: Annotated[int | None, typer.Option(help="At most N images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: DeviceOpt = None,
    allow_other_backbone: AllowOtherOpt = False,
    threads: ThreadsOpt = 1,
) -> None:
    """Write every image's patch tokens (original and corrected) as safetensors shards with an
    index; rerun the same command to resume (torchrun: each process writes its own shards)."""
    from ..data.sources import open_images
    from ..data.transforms import ImageTransform
    from ..extract import DTYPES, extract

    set_threads(threads)
    if dtype not in DTYPES:
        raise SoapvitError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not shard_mb > 0:
        raise SoapvitError(f"--shard-mb must be positive, not {shard_mb}")
    selection = parse_blocks(blocks)
    check_writable(out)
    source = open_images(images, limit)
    backbone, corrections = corrections_for(model, head, variants, device, allow_other_backbone)
    backbone.resolve_blocks(selection)
    transform = ImageTransform.for_backbone(backbone, image_size)
    describe = {**head_description(head), "images": str(images), "limit": limit}
    with RichProgress() as progress:
        result = extract(backbone, source, out, corrections=corrections, blocks=selection, prefix=prefix,
                         dtype=dtype, shard_mb=shard_mb, batch_size=batch_size, image_transform=transform,
                         describe=describe, progress=progress)
    for line in result.log.lines()[:10]:
        say(f"skipped {line}")
    rate = result.images / result.seconds if result.seconds else 0.0
    say(f"wrote {result.images} image(s) in {len(result.written)} new shard(s) ({len(result.kept)} kept from "
        f"before) in {result.seconds:.1f} s ({rate:.1f} images/s) → {out}")


@app.command("export")
def export_command(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="ONNX file to write.")],
    head: HeadOpt = None,
    variant: Annotated[str | None, typer.Option(help="The file's correction to fold in (default: soap, or its only "
                                                     "one).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size of the example (default: the model's).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    allow_other_backbone: AllowOtherOpt = False,
    threads: ThreadsOpt = 1,
) -> None:
    """Export the backbone with the correction folded in to ONNX, checked with onnxruntime."""
    from ..export import export_onnx

    set_threads(threads)
    check_writable(out)
    backbone, corrections = corrections_for(model, head, None, "cpu", allow_other_backbone)
    name, correction = pick_correction(corrections, variant)
    result = export_onnx(backbone, out, correction=correction, correction_name=name,
                         metadata=None if corrections is None else corrections.metadata, image_size=image_size,
                         opset=opset, head_spec=None if head is None else str(head))
    for size, diff in result.differences.items():
        say(f"onnxruntime vs torch{' with ' + name if name else ''} at {size}: max abs difference {diff:.3g}")
    say(f"wrote {out} (dynamic batch{', dynamic image size' if result.dynamic_size else ''}; "
        f"{result.seconds:.1f} s)")


def pick_correction(corrections, variant: str | None):
    """``(name, correction)`` to export: ``variant``, else ``soap``, else the only one."""
    if corrections is None:
        if variant:
            raise SoapvitError("--variant needs --head (the corrections file)")
        return None, None
    if variant is None:
        if "soap" in corrections:
            variant = "soap"
        elif len(corrections) == 1:
            variant = next(iter(corrections))
        else:
            raise SoapvitError(f"the file holds {', '.join(corrections)}: choose one with --variant")
    return variant, corrections.select([variant])[variant]


@app.command("push")
def push_command(
    head: Annotated[Path, typer.Argument(help="Corrections file to upload.")],
    repo: Annotated[str, typer.Argument(help="Hub repo id, user/name.")],
    eval_results: Annotated[list[Path] | None, typer.Option("--eval", help="Evaluation JSON (soapvit eval --out) "
                                                                             "to report in the card; repeatable.")] = None,
    revision: Annotated[str | None, typer.Option(help="Branch to upload to.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    filename: Annotated[str, typer.Option(help="Name of the file in the repo.")] = "corrections.safetensors",
) -> None:
    """Upload a corrections file to the Hugging Face Hub with a generated model card."""
    from ..hub import push_head

    evaluations = []
    for path in eval_results or []:
        try:
            evaluations.append((path.name, json.loads(path.read_text())))
        except (OSError, ValueError) as err:
            raise SoapvitError(f"--eval {path}: {err}") from None
    url = push_head(head, repo, evaluations=evaluations, revision=revision, private=private, filename=filename)
    say(f"uploaded {head} and README.md to {url}")
