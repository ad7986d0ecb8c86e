"""The ``soapvit`` command line: a thin Typer layer over the Python API.

Each command group lives in its own module and registers itself on :data:`app`; this module
only assembles them and turns user errors into one-line messages.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="soapvit",
    help="Find and remove non-semantic noise in self-supervised ViT patch tokens (SOAP).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
eval_app = typer.Typer(help="Zero-shot evaluations, original vs SOAP-corrected tokens.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

console = Console(stderr=True)  # progress, warnings, errors
report = Console()  # results

# each command module registers its commands on import, in the order `--help` lists them
from . import soap_commands, evaluate, probe, pretrain, html_report  # noqa: E402,F401,I001


def main(args: list[str] | None = None) -> None:
    """Entry point: run the app; user errors print one line and exit with status 2."""
    from ..errors import SoapvitError

    try:
        app(args)
    except (SoapvitError, FileNotFoundError, NotADirectoryError) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
