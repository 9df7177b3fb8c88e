"""The lever interface: one module per lever, each knowing three things about itself.

- **analyse**: turn a captured step into terms for the solver -- plain data: choices per value or
  per region, each with its bytes over time and its time cost;
- **apply**: carry out a decision -- passes over the step's graphs (each a
  :class:`~fxmem.passes.base.GraphPass`, so every rewrite is recorded), or what the step holds
  beyond its graph (:class:`~fxmem.planning.options.StepContext`);
- **runtime** (where the maths needs it): a wrapper around the compiled step -- the microbatch
  loop, later the sparse regrow hook and the loss scaler.

The planner asks each allowed lever in turn; a lever that changes numerics says so
(``exact = False``) and runs only when the user allows it. Levers register by name in
:data:`REGISTRY`; a lever named in ``allow`` that is not built yet is reported as such.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

from fxmem.passes.base import PassRecord, StepGraphs

__all__ = ["Lever", "REGISTRY", "register", "lever_for", "NOT_BUILT"]


class Lever(abc.ABC):
    """A way to trade time (or accuracy) for memory. Subclasses set ``name`` and ``exact``."""

    name: ClassVar[str]
    exact: ClassVar[bool]  # gradients equal eager PyTorch's (else: allowed only when asked)

    @abc.abstractmethod
    def analyse(self, *args: Any, **kwargs: Any) -> Any:
        """The lever's terms for the solver, as plain data."""

    def apply(self, graphs: StepGraphs, decision: Any) -> tuple[StepGraphs, list[PassRecord]]:
        """The step's graphs with the decision carried out, and a record per pass (default:
        the lever does not rewrite graphs)."""
        return graphs, []

    def runtime(self, fn: Callable, decision: Any) -> Callable:
        """The compiled step wrapped as the decision needs at run time (default: as it is)."""
        return fn


REGISTRY: dict[str, type[Lever]] = {}
# levers the design names that are not built yet: allowed in ``allow``, applied by nothing
NOT_BUILT: tuple[str, ...] = ()


def register(cls: type[Lever]) -> type[Lever]:
    """Class decorator: make a lever known by its name."""
    REGISTRY[cls.name] = cls
    return cls


def lever_for(name: str) -> type[Lever]:
    """The lever class named ``name``; a clear error for one not built yet or unknown."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name in NOT_BUILT:
        raise NotImplementedError(f"the {name!r} lever is not built yet")
    raise ValueError(f"unknown lever {name!r}; the levers are {sorted([*REGISTRY, *NOT_BUILT])}")
