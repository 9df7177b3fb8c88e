"""One answer per recompute problem in a process: the time-limited solvers made deterministic.

The ILP stops at its time limit with the best answer found so far, so solving the same problem
twice can give two answers -- two plans for one step. ``OptimizedModule.plan_for`` followed by the
first call, or a floor search followed by a plan at that floor, would then disagree: a budget the
first plan met could fail the second (seen on WRN-28-2 with every lever: planned at 1.05x its floor
by ``plan_for``, then refused by the call that ran it). :func:`memoised` keeps each solver's answer
per (problem, budget and options) for the process, so the same problem gets the same answer, and
an unchanged step is not solved again.

The key is a digest of the problem's plain data (:func:`fingerprint`): names, arrays, inputs,
pulls; no graph. At most :data:`MAX_KEPT` answers are kept, least recently used dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from fxmem.solver.problem import RecomputeProblem
from fxmem.solver.result import RecomputeSolution

__all__ = ["fingerprint", "memoised", "clear_solutions", "MAX_KEPT"]

log = logging.getLogger(__name__)

MAX_KEPT = 256
_KEPT: collections.OrderedDict[tuple, RecomputeSolution] = collections.OrderedDict()
F = TypeVar("F", bound=Callable[..., RecomputeSolution])


def fingerprint(problem: RecomputeProblem) -> str:
    """A digest of everything a solver reads from ``problem``."""
    h = hashlib.blake2b(digest_size=20)
    for field in dataclasses.fields(problem):
        value = getattr(problem, field.name)
        h.update(field.name.encode())
        if isinstance(value, np.ndarray):
            h.update(f"{value.dtype}{value.shape}".encode())
            h.update(np.ascontiguousarray(value).tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def memoised(solver: F) -> F:
    """``solver(problem, *args, **kwargs)`` answered once per problem and arguments."""

    @functools.wraps(solver)
    def wrapper(problem: RecomputeProblem, *args, **kwargs) -> RecomputeSolution:
        key = (solver.__name__, fingerprint(problem), args, tuple(sorted(kwargs.items())))
        kept = _KEPT.get(key)
        if kept is not None:
            _KEPT.move_to_end(key)
            log.debug("%s: the answer of an identical problem (%d candidates) reused",
                      solver.__name__, len(problem.names))
            return kept
        solution = solver(problem, *args, **kwargs)
        _KEPT[key] = solution
        while len(_KEPT) > MAX_KEPT:
            _KEPT.popitem(last=False)
        return solution

    return wrapper  # type: ignore[return-value]


def clear_solutions() -> None:
    """Forget every kept answer (the next solve of each problem runs the solver)."""
    _KEPT.clear()
