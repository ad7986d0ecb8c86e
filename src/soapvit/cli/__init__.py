"""The ``soapvit`` command line: a thin Typer layer over the Python API.

Each command group lives in its own module and registers itself on :data:`app`; this module
only assembles them and turns user errors into one-line messages.
"""

from __future__ import annotations

import os
import sys
import traceback

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

# user text (file names, ids) is printed literally: no ``:bomb:`` emoji codes anywhere; the
# commands escape markup (``[…]``) in user text with rich.markup.escape (common.say)
console = Console(stderr=True, emoji=False)  # progress, warnings, errors
report = Console(emoji=False)  # results

# each command module registers its commands on import, in the order `--help` lists them
from . import soap_commands, evaluate, artifacts, probe, pretrain, html_report, transfer  # noqa: E402,F401,I001
from .common import Interrupted, guard_command  # noqa: E402

for _group in (app, eval_app):  # shared checks before any work: counts ≥ 1, outputs that are no input
    for _command in _group.registered_commands:
        _command.callback = guard_command(_command.callback)


def show_version(value: bool) -> None:
    if value:
        from .. import __version__

        report.print(f"soapvit {__version__}")
        raise typer.Exit()


@app.callback()
def options(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                         help="Print the version and exit.")) -> None:
    """Find and remove non-semantic noise in self-supervised ViT patch tokens (SOAP)."""


def _option_value(args: list[str], option: str) -> str | None:
    """The value given to ``option`` in ``args`` (``--opt VALUE`` or ``--opt=VALUE``), or None."""
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg[len(option) + 1 :]
    return None


def interrupted_line(args: list[str]) -> str:
    """The one line printed on Ctrl-C: the run was interrupted, and how to continue it when it
    keeps resumable state (``--checkpoint`` of fit; pretrain's ``--out`` checkpoint)."""
    checkpoint = _option_value(args, "--checkpoint")
    if checkpoint is not None:
        return (f"interrupted: the state saved in --checkpoint {checkpoint} is kept; "
                "run the same command again to continue from it")
    out = _option_value(args, "--out")
    if args and args[0] == "pretrain" and out is not None and os.path.isfile(out):
        return f"interrupted: {out} holds the last checkpoint; add --resume {out} to continue from it"
    return "interrupted"


def main(args: list[str] | None = None) -> None:
    """Entry point: user errors print one line on stderr and exit with status 2; anything else is a
    bug: its traceback is printed, with a line saying so, and the status is 1."""
    from rich.markup import escape

    from ..errors import SoapvitError

    try:
        code = app(args, standalone_mode=False)
    except (Interrupted, KeyboardInterrupt):
        code = 130  # typer itself turns a Ctrl-C outside a command into a silent exit 130
    except typer.Abort:
        console.print("aborted", highlight=False)
        sys.exit(130)
    except typer.TyperException as err:  # usage errors: unknown commands, bad option names or values
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare command group: its help
            report.print(err.ctx.get_help(), highlight=False)
            sys.exit(0)
        console.print(f"[bold red]error:[/] {escape(err.format_message())}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (SoapvitError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception:
        traceback.print_exc()
        console.print("[bold red]This is a bug in soapvit[/]: please report it with the command and the traceback above.",
                      highlight=False)
        sys.exit(1)
    if code == 130:
        console.print(escape(interrupted_line(sys.argv[1:] if args is None else args)), highlight=False,
                      soft_wrap=True)
    sys.exit(code or 0)
