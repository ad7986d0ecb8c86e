"""Declarative checks of options: each job states its constraints once, as data.

A constraint is an :class:`Interval` (numbers in a range) or :class:`Options` (one of a set);
:func:`validate` checks a mapping of values against a mapping of constraints and raises one
:class:`~soapvit.errors.SoapvitError` naming the option as the CLI spells it (``--image-size``).
``None`` passes wherever the constraint has ``optional=True``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import SoapvitError


def option_name(name: str) -> str:
    """``image_size`` → ``--image-size``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Interval:
    """A number in ``[low, high]``; ``open_low``/``open_high`` exclude the bounds."""

    kind: type = float
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    optional: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '≥'} {self.low}")
        if self.high is not None:
            parts.append(f"{'<' if self.open_high else '≤'} {self.high}")
        return f"{what} {' and '.join(parts)}".strip()

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)


@dataclass(frozen=True)
class Options:
    """One of ``choices``."""

    choices: tuple
    optional: bool = False

    def describe(self) -> str:
        return "one of " + ", ".join(str(c) for c in self.choices)

    def accepts(self, value) -> bool:
        return value in self.choices


Constraint = Interval | Options

COUNT = Interval(int, 1)
OPTIONAL_COUNT = Interval(int, 1, optional=True)
POSITIVE = Interval(float, 0, open_low=True)
FRACTION = Interval(float, 0, 1, open_low=True, open_high=True)


def validate(values: Mapping[str, object], constraints: Mapping[str, Constraint]) -> None:
    """Raise on the first value that breaks its constraint (values without one are not checked)."""
    for name, constraint in constraints.items():
        if name not in values:
            continue
        value = values[name]
        if value is None and constraint.optional:
            continue
        if not constraint.accepts(value):
            raise SoapvitError(f"{option_name(name)} must be {constraint.describe()}, not {value!r}")


def check_each(name: str, values: Iterable, constraint: Constraint) -> None:
    """Every element of a list option against one constraint."""
    for value in values:
        validate({name: value}, {name: constraint})
