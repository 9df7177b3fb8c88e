"""What one joint exploration (:func:`fxmem.planning.joint.explore`) computes once and reuses.

The joint planner plans many combinations of the same step. Outside a :func:`session` nothing
here does anything; inside one:

- :func:`recording` collects every joint graph the planner prepares
  (:class:`~fxmem.planning.planner.PreparedJoint`, noted by :func:`note_prepared`), so a capture
  planned under the budget is planned again for its floor and with no limit, without capturing
  the step again;
- :func:`memoised` keeps a value per key within the session's current :func:`scope` -- the
  microbatch lever's batch analysis (the whole batch's step traced once per precision and
  density, not once per microbatch count).

(The sparse kernels are chosen once per layer configuration for the whole process, not here:
:func:`fxmem.levers.sparse.kernels.choose_kernel`, so an explored point and the same settings
built again by ``fxmem.optimize`` run the same kernels.)

A scope names what the keys cannot see: the joint planner opens one per (precision, density),
whose model (sparsified in place at that density) and autocast state stay the same within it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

__all__ = ["Session", "session", "scope", "recording", "note_prepared", "memoised", "current"]

T = TypeVar("T")


class Session:
    """The reuse of one exploration: the memo per scope, the open recordings, what was reused."""

    def __init__(self):
        self.memo: dict[Hashable, Any] = {}
        self.scope: Hashable | None = None
        self.recordings: list[list] = []
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}


_CURRENT: contextvars.ContextVar[Session | None] = contextvars.ContextVar("fxmem_reuse",
                                                                          default=None)


def current() -> Session | None:
    return _CURRENT.get()


@contextlib.contextmanager
def session() -> Iterator[Session]:
    """A fresh reuse session for the block (nested sessions do not share)."""
    token = _CURRENT.set(Session())
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def scope(name: Hashable) -> Iterator[None]:
    """Memoised values within the block are kept under ``name`` (a no-op outside a session)."""
    s = current()
    if s is None:
        yield
        return
    outer, s.scope = s.scope, name
    try:
        yield
    finally:
        s.scope = outer


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """The list of :class:`~fxmem.planning.planner.PreparedJoint` prepared within the block
    (empty outside a session)."""
    found: list = []
    s = current()
    if s is None:
        yield found
        return
    s.recordings.append(found)
    try:
        yield found
    finally:
        s.recordings.remove(found)


def note_prepared(prepared) -> None:
    """Called by the planner with each joint graph it prepares."""
    s = current()
    if s is not None:
        for found in s.recordings:
            found.append(prepared)


def memoised(kind: str, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, once per ``(kind, key)`` within the session's current scope; computed
    every time outside a session or a scope."""
    s = current()
    if s is None or s.scope is None:
        return compute()
    full = (s.scope, kind, key)
    if full in s.memo:
        s.hits[kind] = s.hits.get(kind, 0) + 1
        return s.memo[full]
    s.misses[kind] = s.misses.get(kind, 0) + 1
    value = s.memo[full] = compute()
    return value
