"""The memory budget: parsing, formatting, and the error raised when a budget cannot be met.

The budget bounds the peak bytes held by tensors on the device during one training iteration
(parameters, buffers, gradients, optimizer state, inputs, saved activations and temporaries).
Integers are bytes; strings take a unit: ``"512MiB"``, ``"2GB"``, ``"1.5GiB"``.
"""

from __future__ import annotations

import math
import re

from fxmem.errors import FxmemError

__all__ = ["BudgetError", "parse_budget", "format_bytes"]

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


class BudgetError(FxmemError, ValueError):
    """A memory budget that no plan can meet, or a budget that is not a budget.

    ``floor`` is the smallest feasible budget in bytes when it is known (else ``None``),
    ``holders`` names what holds that floor, e.g. ``{"parameters": 68157440, ...}``, and
    ``unoptimized`` is the peak of the step with nothing rewritten, when known.
    """

    def __init__(self, message: str, floor: int | None = None, holders: dict[str, int] | None = None,
                 unoptimized: int | None = None):
        super().__init__(message)
        self.floor = floor
        self.holders = dict(holders or {})
        self.unoptimized = unoptimized

    def with_hint(self, hint: str | None) -> "BudgetError":
        """The same error with ``hint`` (what else was tried, or how to fit) added to its
        message."""
        if not hint:
            return self
        return BudgetError(f"{self}\n{hint}", floor=self.floor, holders=self.holders,
                           unoptimized=self.unoptimized)


def parse_budget(budget: int | float | str) -> int:
    """Return a budget in bytes.

    >>> parse_budget("1.5GiB")
    1610612736
    >>> parse_budget(4096)
    4096
    """
    if isinstance(budget, bool):
        raise BudgetError(f"budget must be bytes (int) or a string with a unit, not {budget!r}")
    if isinstance(budget, int):
        value = float(budget)
    elif isinstance(budget, float):
        if not math.isfinite(budget) or budget != int(budget):
            raise BudgetError(f"a budget in bytes must be a whole number, got {budget!r}")
        value = budget
    elif isinstance(budget, str):
        match = _BUDGET_RE.match(budget)
        if match is None:
            raise BudgetError(
                f"cannot read budget {budget!r}: expected a number and a unit, e.g. '512MiB' or '2GB'"
            )
        number, unit = match.groups()
        unit_key = unit.lower() or "b"
        if unit_key not in _UNITS:
            known = ", ".join(["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
            raise BudgetError(f"unknown unit {unit!r} in budget {budget!r}; known units: {known}")
        value = float(number) * _UNITS[unit_key]
    else:
        raise BudgetError(
            f"budget must be bytes (int) or a string with a unit, not {type(budget).__name__}"
        )
    if value <= 0:
        raise BudgetError(f"budget must be positive, got {budget!r}")
    return int(round(value))


def format_bytes(n: int | float) -> str:
    """Human-readable bytes with binary units: ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
