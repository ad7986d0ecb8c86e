"""What every command shares: option types, argument parsing, progress, printing, JSON output.

Commands parse and check every argument here before a model is loaded, so a typo costs nothing.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, get_args, get_origin

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import io
from ..errors import SoapvitError
from . import console, report

@dataclass(frozen=True)
class Output:
    """Marks an option as something the command writes (in its ``Annotated`` type): a file with
    one of ``suffixes`` (any name when empty) or a ``folder``; ``updates`` names the inputs it may
    equal (a checkpoint the command continues, replaced atomically). :func:`guard_command` checks
    every marked option of a command before the command runs."""

    suffixes: tuple[str, ...] = ()
    what: str = "a file"
    folder: bool = False
    updates: tuple[str, ...] = ()


JSON_OUT = Output((".json",), "JSON")
HEAD_OUT = Output((".safetensors",), "a corrections file")
HTML_OUT = Output((".html", ".htm"), "an HTML page")
FIGURE_OUT = Output((".png", ".pdf", ".svg", ".jpg", ".jpeg"), "a figure")
FOLDER_OUT = Output(folder=True, what="a folder")
NAMED_OUTPUTS = {"figure": FIGURE_OUT, "save_masks": FOLDER_OUT}
"""Outputs every command spells the same way, marked by their parameter name when the option's
type carries no :class:`Output` (``--figure fig.txt`` or ``--save-masks`` naming a file is refused)."""


ModelOpt = Annotated[str, typer.Option(help="Backbone id: hf:<repo|dir>, timm:<name>, zoo:<name>.")]
HeadOpt = Annotated[Path | None, typer.Option(help="Corrections file from soapvit fit: also score its variants.")]
VariantsOpt = Annotated[str | None, typer.Option(help="Comma list of the file's corrections to score (default: all).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (default: auto).")]
OutOpt = Annotated[Path | None, typer.Option(help="Write the results as JSON here."), JSON_OUT]
AllowOtherOpt = Annotated[bool, typer.Option(
    "--allow-other-backbone", help="Apply a head fitted for another backbone or other weights.")]
BlocksOpt = Annotated[str, typer.Option("--blocks", "--layers", help="Blocks: all, last or a comma list (0-based).")]
ThreadsOpt = Annotated[int, typer.Option(
    help="CPU threads for torch (at most the number of cores; 1 is fastest on a busy machine).")]


def parse_blocks(value: str) -> str | list[int]:
    """``all``, ``last`` or a comma list of block indices (negative allowed)."""
    if value in ("all", "last"):
        return value
    try:
        blocks = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        blocks = []
    if not blocks:
        raise SoapvitError(f"--blocks must be 'all', 'last' or a comma list of block indices, not {value!r}")
    return blocks


def parse_int_list(value: str, option: str) -> list[int]:
    """A comma list of integers (empty → [])."""
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SoapvitError(f"{option} must be a comma list of integers, not {value!r}") from None


def check_writable(path: Path | None, option: str = "--out") -> None:
    """Fail now, not after the compute, when ``path`` cannot be written."""
    if path is None:
        return
    folder = path.parent if path.suffix else path
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if path.is_dir() and path.suffix:
        raise SoapvitError(f"{option} {path} is a folder")
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise SoapvitError(f"{option} {path}: {existing or folder} is not a writable folder")


def _option_name(name: str, annotation) -> str:
    """How the CLI spells parameter ``name`` (its first declared option name)."""
    for meta in get_args(annotation)[1:] if get_origin(annotation) is Annotated else ():
        decls = [d for d in (getattr(meta, "default", None), *(getattr(meta, "param_decls", None) or ()))
                 if isinstance(d, str) and d.startswith("-")]
        if decls:
            return decls[0]
    return "--" + name.replace("_", "-")


def _paths(value) -> list[Path]:
    """The existing paths a parameter value names (a path, a list of them, or a string that is one)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    found = []
    for v in values:
        if isinstance(v, (str, Path)) and str(v) and os.path.exists(v):
            found.append(Path(v))
    return found


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_outputs(values: dict[str, object], outputs: dict[str, tuple[str, Output]],
                  names: dict[str, str] | None = None) -> None:
    """Refuse, before any work, an output option (``name → (option, Output)``) that has the wrong
    suffix or kind for what is written, or that is one of the command's inputs (every other
    path-valued parameter in ``values``): a command never writes over what it reads."""
    inputs = [(n, p) for n, v in values.items() if n not in outputs for p in _paths(v)]
    for name, (option, spec) in outputs.items():
        path = values.get(name)
        if path is None:
            continue
        path = Path(path)
        if spec.folder:
            if path.exists() and not path.is_dir():
                raise SoapvitError(f"{option} {path} is a file: give a folder")
        else:
            if path.is_dir():
                raise SoapvitError(f"{option} {path} is a folder: give a file name")
            if spec.suffixes and path.suffix.lower() not in spec.suffixes:
                raise SoapvitError(f"{option} {path}: this option writes {spec.what}; give a name ending in "
                                   f"{' or '.join(spec.suffixes)}")
        if path.exists():
            for other, source in inputs:
                if other not in spec.updates and _same_file(path, source):
                    spelled = (names or {}).get(other) or _option_name(other, None)
                    raise SoapvitError(f"{option} {path} is the input {spelled} {source}: "
                                       "writing it would destroy it; give another path")


class Interrupted(Exception):
    """Ctrl-C during a command: :func:`soapvit.cli.main` prints one line saying so (and how to
    continue) and exits with status 130."""


COUNT_OPTIONS = ("limit", "count", "per_class", "val_per_class")
"""Parameters that count images: one rule for every command, at least 1 (or not given)."""
SEED_OPTIONS = ("seed",)
SEED_MAX = 2**32 - 1
"""Seeds: one rule for every command, 0 … 2³² − 1, so that every seed derived from one (per
image, per view, per rank) still fits torch's and numpy's 64-bit generators."""


def guard_command(callback):
    """``callback`` with the checks every command shares run first, before any work: its count
    options (:data:`COUNT_OPTIONS`) are ≥ 1, its seed is within :data:`SEED_MAX` and its :class:`Output`-marked parameters pass
    :func:`check_outputs`; Ctrl-C during the command comes out as :class:`Interrupted`."""
    from ..validation import OPTIONAL_COUNT, Interval, validate

    SEED = Interval(int, 0, SEED_MAX, optional=True)

    try:
        signature = inspect.signature(callback, eval_str=True)
    except (NameError, TypeError):  # annotations it cannot resolve here: typer will say so
        return callback
    outputs, names = {}, {}
    for name, param in signature.parameters.items():
        names[name] = _option_name(name, param.annotation) if param.kind is not param.VAR_KEYWORD else name
        spec = next((m for m in get_args(param.annotation)[1:] if isinstance(m, Output)), None) \
            if get_origin(param.annotation) is Annotated else NAMED_OUTPUTS.get(name)
        spec = spec or NAMED_OUTPUTS.get(name)
        if spec is not None:
            outputs[name] = (_option_name(name, param.annotation), spec)
    rules = {n: OPTIONAL_COUNT for n in COUNT_OPTIONS if n in signature.parameters}
    rules.update({n: SEED for n in SEED_OPTIONS if n in signature.parameters})

    @functools.wraps(callback)
    def guarded(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        for name, rule in rules.items():
            if name in bound.arguments:
                try:
                    validate({name: bound.arguments[name]}, {name: rule})
                except SoapvitError as err:
                    raise SoapvitError(str(err).replace(f"--{name.replace('_', '-')}", names[name], 1)) from None
        check_outputs(dict(bound.arguments), outputs, names)
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt:  # typer would turn it into a silent exit 130
            raise Interrupted() from None

    return guarded


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """torch's CPU thread count: the one place the library's thread use is decided. More threads
    than cores only wait on each other: capped at the core count, with a warning. Returns it."""
    import torch

    if threads < 1:
        raise SoapvitError(f"--threads must be at least 1, not {threads}")
    cores = available_cores()
    if threads > cores:
        console.print(f"[yellow]warning:[/] --threads {threads} is more than the {cores} core(s) here: using {cores}",
                      highlight=False)
        threads = cores
    torch.set_num_threads(threads)
    return threads


def load_backbone(model: str, device: str | None):
    """The backbone on this process's device; under torchrun this joins the process group first
    (see :func:`join_launcher`)."""
    from ..backbones import load
    from ..features import resolve_device

    return load(model, device=str(join_launcher(resolve_device(device))))


def join_launcher(device):
    """Under torchrun: join its process group (gloo on CPU, NCCL on CUDA, one GPU per local rank)
    and silence every rank but 0, which alone prints and writes. Returns this rank's device."""
    from .. import distributed

    device = distributed.setup(device)
    if not distributed.is_main():
        console.quiet = report.quiet = True
    return device


def load_corrections(path: Path | None, variants: str | None = None):
    """The corrections of a file (those named in ``variants``, a comma list), or None."""
    from ..corrections import CorrectionSet

    if path is None:
        if variants:
            raise SoapvitError("--variants needs --head (the corrections file)")
        return None
    names = None if variants is None else [v.strip() for v in variants.split(",") if v.strip()]
    if str(path).startswith("hf:"):  # a head on the Hugging Face Hub: local cache first (soapvit.hub)
        from ..hub import resolve_head

        path = resolve_head(str(path))
    return CorrectionSet.load(path).select(names)


def corrections_for(model: str, head_path: Path | None, variants: str | None, device: str | None,
                    allow_other: bool):
    """Load the corrections first (cheap), then the backbone, and check that they belong together
    (the one backbone check). Returns ``(backbone, corrections or None)``."""
    corrections = load_corrections(head_path, variants)
    backbone = load_backbone(model, device)
    if corrections is not None:
        corrections.check_backbone(backbone, allow_other=allow_other)
    return backbone, corrections


class RichProgress:
    """Adapter from ``progress(stage, done, total)`` callbacks to a Rich progress display."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(escape(stage), total=total)
        self.bar.update(self.tasks[stage], completed=done)


def say(text: str) -> None:
    """A line of user-derived text on stderr, never read as markup."""
    console.print(escape(text), highlight=False, soft_wrap=True)


def print_log(result) -> None:
    """A report's warnings and skipped files, each with its reason."""
    for note in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    lines = result.log.lines()
    if lines:
        console.print(f"[yellow]skipped {len(lines)} input(s):[/]", highlight=False)
        for line in lines[:10]:
            say(f"  {line}")
        if len(lines) > 10:
            say(f"  … and {len(lines) - 10} more (all listed in the output file)")


def print_side_by_side(title: str, results: dict[str, dict], columns: list[tuple[str, str]],
                       intervals: dict[str, dict] | None = None, passes: dict[str, str] | None = None) -> None:
    """One row per variant with each metric (and whether it had its own forward pass); then, for
    the corrected variants, the difference to the original with its paired 95 % interval."""
    intervals, passes = intervals or {}, passes or {}
    table = Table(title=escape(title))
    table.add_column("variant")
    for _, label in columns:
        table.add_column(label, justify="right")
    if passes:
        table.add_column("pass")
    for variant, res in results.items():
        cells = [f"{res[key]:.2f}" if isinstance(res[key], float) else str(res[key]) for key, _ in columns]
        table.add_row(escape(variant), *cells, *([passes.get(variant.split("/")[0], "")] if passes else []))
    report.print(table)
    keys = [(key, label) for key, label in columns if any(key in i for i in intervals.values())]
    if not keys:
        return
    table = Table(title="Δ to original [95% CI, paired bootstrap over images]")
    table.add_column("variant")
    for _, label in keys:
        table.add_column(f"Δ{label}", justify="right")
    for variant, ci in intervals.items():
        table.add_row(escape(variant), *(f"{ci[k]['delta']:+.2f} [{ci[k]['low']:+.2f}, {ci[k]['high']:+.2f}]"
                                         for k, _ in keys))
    report.print(table)


def write_json(path: Path | None, payload: dict) -> None:
    """Write ``payload`` (rank 0 only under torchrun)."""
    from .. import distributed

    if path is not None and distributed.is_main():
        io.write_json(path, payload)
        say(f"wrote {path}")
