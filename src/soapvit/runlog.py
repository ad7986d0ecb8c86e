"""What a run records besides its results: skipped inputs, warnings, timings.

Every job (fit, TokenCut, kNN segmentation, probes, attention statistics) keeps one
:class:`RunLog`, records each skipped file and each warning once with its reason, and returns a
report derived from :class:`RunReport`, so every JSON and head file carries the same fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: the one progress callback of the library."""


@dataclass
class RunLog:
    """Skipped inputs (``{"file", "reason"}``) and warnings, each recorded once."""

    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def skip(self, name: str, reason: str) -> None:
        entry = {"file": str(name), "reason": str(reason)}
        if entry not in self.skipped:
            self.skipped.append(entry)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(str(message))

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
