"""What every script in ``benchmarks/`` writes beside what it prints: one JSON file (``--out``,
default ``results/benchmarks/<script>.json``, written atomically) with the exact command line
(paths relative to the repository), the day, the machine (CPU model, cores, torch version and
threads, load average before and after), the settings, the measurements and the printed lines.
``scripts/benchmark_tables.py`` builds BENCHMARKS.md's tables from these files.

    record = Record(__file__, parser)      # adds --out; parse with record.parse()
    args = record.parse()
    record.print("…")                      # printed and kept
    record.results["ratio"] = 0.91         # the measurements, as numbers
    record.write()
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from soapvit.io import write_json

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _relative(token: str) -> str:
    """An argument naming an existing file or folder, as a path relative to the repository."""
    if token.startswith("-") and "=" in token:
        flag, value = token.split("=", 1)
        return f"{flag}={_relative(value)}"
    path = Path(token)
    if not token or token.startswith("-"):
        return token
    if path.is_absolute():
        return os.path.relpath(path, ROOT)
    if Path.cwd() != ROOT and path.exists():
        return os.path.relpath(path.resolve(), ROOT)
    return token


def _setting(value):
    """A setting as JSON: a path as a string, relative to the repository when it was absolute."""
    if isinstance(value, Path):
        value = str(value)
    return _relative(value) if isinstance(value, str) and Path(value).is_absolute() else value


def command_line(script: str) -> str:
    """``python benchmarks/NAME.py ARGS`` (``torchrun --nproc-per-node N …`` under torchrun)."""
    runner = "python"
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        runner = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '1')}"
    args = [_relative(a) for a in sys.argv[1:]]
    return " ".join([runner, os.path.relpath(Path(script).resolve(), ROOT), *map(shlex.quote, args)])


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


class Record:
    def __init__(self, script: str, parser: argparse.ArgumentParser):
        self.script = script
        self.name = Path(script).stem
        self.parser = parser
        parser.add_argument("--out", default=None,
                            help=f"JSON file of the measurements (default results/benchmarks/{self.name}.json)")
        self.results: dict = {}
        self.lines: list[str] = []
        self.load_before = os.getloadavg()
        self.args: argparse.Namespace | None = None

    def parse(self, argv=None) -> argparse.Namespace:
        self.args = self.parser.parse_args(argv)
        return self.args

    def print(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self) -> Path:
        args = vars(self.args or argparse.Namespace())
        out = Path(args.get("out") or ROOT / "results" / "benchmarks" / f"{self.name}.json")
        payload = {
            "benchmark": self.name,
            "command": command_line(self.script),
            "date": datetime.date.today().isoformat(),
            "machine": machine() | {"load_average": {"before": [round(x, 2) for x in self.load_before],
                                                     "after": [round(x, 2) for x in os.getloadavg()]}},
            "settings": {k: _setting(v) for k, v in args.items() if k != "out"},
            "results": self.results,
            "printed": self.lines,
        }
        write_json(out, payload, what="benchmark results")
        print(f"wrote {os.path.relpath(out.resolve(), Path.cwd())}", file=sys.stderr)
        return out
