"""What a run records besides its results: skipped inputs, warnings, timings.

Every job (fit, TokenCut, kNN segmentation, probes, attention statistics) keeps one
:class:`RunLog`, records each skipped file and each warning once with its reason, and returns a
report derived from :class:`RunReport`, so every JSON and head file carries the same fields.

A log's order is its content's, never the order things happened in: skipped files come in path
order (the order a folder source lists them, :func:`soapvit.data.images.list_images`), warnings
in text order. Loader workers, the batches each rank of a :mod:`torch.distributed` group
encodes, a merge of the ranks' logs and a resumed run therefore all give the same log as one
process reading the data in one go.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import ClassVar

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: the one progress callback of the library."""


def skipped_key(entry: dict[str, str]) -> tuple:
    """Where a skipped entry goes in a log: by its file's path, folder by folder, then reason."""
    return PurePath(entry["file"]).parts, entry["file"], entry["reason"]


def _insert(entries: list, entry, key: Callable) -> None:
    """``entry`` into the sorted ``entries`` at its place by ``key``, unless it is there already."""
    at = bisect.bisect_left(entries, key(entry), key=key)
    if at == len(entries) or entries[at] != entry:
        entries.insert(at, entry)


@dataclass
class RunLog:
    """Skipped inputs (``{"file", "reason"}``) and warnings, each recorded once, in the order of
    the module doc (path order, text order) whatever order they were recorded in."""

    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:  # a log read back (a resumed run's) takes the same order
        entries, messages = self.skipped, self.warnings
        self.skipped, self.warnings = [], []
        self.merge(entries, messages)

    def skip(self, name: str, reason: str) -> None:
        _insert(self.skipped, {"file": str(name), "reason": str(reason)}, skipped_key)

    def warn(self, message: str) -> None:
        _insert(self.warnings, str(message), str)

    def merge(self, skipped: Iterable[dict[str, str]] = (), messages: Iterable[str] = ()) -> RunLog:
        """Record other entries here (another rank's, a resumed run's); returns this log."""
        for entry in skipped:
            self.skip(entry["file"], entry["reason"])
        for message in messages:
            self.warn(message)
        return self

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record the ``warnings.warn`` calls of the enclosed code here instead of printing them."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            self.warn(str(w.message))

    def lines(self) -> list[str]:
        """One line per skipped file: ``file: reason``."""
        return [f"{s['file']}: {s['reason']}" for s in self.skipped]

    def to_dict(self) -> dict:
        return {"skipped": list(self.skipped), "warnings": list(self.warnings)}


@dataclass
class RunReport:
    """The shape every job returns: results, the settings that produced them, the log, timings.

    Subclasses add their own fields; :meth:`to_dict` serialises every plain field.
    """

    results: dict
    settings: dict
    log: RunLog = field(default_factory=RunLog)
    seconds: dict[str, float] = field(default_factory=dict)

    kind: ClassVar[str] = "run"
    private_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def skipped(self) -> list[dict[str, str]]:
        return self.log.skipped

    @property
    def warnings(self) -> list[str]:
        return self.log.warnings

    def to_dict(self) -> dict:
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):  # instance fields only: not the ClassVars kind, private_fields
            if f.name == "log" or f.name in self.private_fields:
                continue
            out[f.name] = getattr(self, f.name)
        return out | self.log.to_dict()
