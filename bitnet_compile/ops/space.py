"""A kernel template's search space, as data: each knob's domain, and the constraints between
knobs (and the shape) written as Python expressions, so that ``bitnet-compile schedules space``
can print them and the tuner can reject a point before anything is compiled."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError


def require_positive(knobs: object, *names: str) -> None:
    """Knobs reach a kernel from records, defaults.json and the command line, so each count
    (unrolls, blocks, splits) is checked before it can become a zero-trip loop or a split by 0."""
    for name in names:
        if getattr(knobs, name) < 1:
            raise UserError(f"knob {name}={getattr(knobs, name)} must be >= 1")


@dataclass(frozen=True)
class Constraint:
    """``expr`` is evaluated over the knobs plus the layer's ``n`` and ``k``, the ``threads``
    and the template's constants (no builtins);
    ``why`` says what breaks when it is false."""

    expr: str
    why: str

    def holds(self, names: dict[str, Any]) -> bool:
        return bool(eval(self.expr, {"__builtins__": {}}, dict(names)))  # noqa: S307 - our own expressions


@dataclass(frozen=True)
class SearchSpace:
    """Knob name -> the values it may take (in the order a grid would list them)."""

    knobs: dict[str, tuple]
    constraints: tuple[Constraint, ...] = field(default=())

    def violations(self, point: dict[str, Any], context: dict[str, int]) -> list[str]:
        """The constraints ``point`` breaks (with their reasons), and knobs outside their
        domain; ``context`` holds the other names the constraints use (n, k, threads, ...)."""
        problems = self.outside_domains(point)
        if problems:
            return problems
        names = {**context, **point}
        return [f"{c.expr} ({c.why})" for c in self.constraints if not c.holds(names)]

    def outside_domains(self, point: dict[str, Any]) -> list[str]:
        return [
            f"{name}={point.get(name)!r} is not one of {list(values)}"
            for name, values in self.knobs.items()
            if point.get(name) not in values
        ]

    def points(self, context: dict[str, int]) -> Iterator[dict[str, Any]]:
        """Every valid point, in grid order."""
        for values in itertools.product(*self.knobs.values()):
            point = dict(zip(self.knobs, values))
            if not self.violations(point, context):
                yield point

    def size(self, context: dict[str, int]) -> int:
        return sum(1 for _ in self.points(context))

    def describe(self) -> list[str]:
        """Human-readable lines: one per knob, one per constraint."""
        lines = [f"{name}: {', '.join(map(str, values))}" for name, values in self.knobs.items()]
        return lines + [f"constraint: {c.expr}  ({c.why})" for c in self.constraints]
