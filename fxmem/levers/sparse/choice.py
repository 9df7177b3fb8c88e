"""The least sparsity that meets a budget: the largest density whose planned floor fits.

:func:`least_sparsity` sparsifies copies of the model at each candidate density (largest first)
and asks fxmem's planner for the floor of each (:func:`fxmem.floor`: the smallest budget the
allowed levers meet on these inputs, nothing run), stopping at the first that fits. Fewer
non-zeros lower the floor (parameters, gradients and optimizer state shrink; the transient dense
weight of the largest layer stays), so the first fitting density is the least sparsity that fits.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fxmem.budget import BudgetError, format_bytes, parse_budget

__all__ = ["DENSITIES", "DensityChoice", "least_sparsity"]

log = logging.getLogger(__name__)

DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)


@dataclasses.dataclass(frozen=True)
class DensityChoice:
    """The density chosen, its floor, and the floor of every density tried (bytes)."""

    density: float
    floor: int
    floors: Mapping[float, int]


def _floor_at(model, density, args, kwargs, optimizer, sparsify_options, options) -> int:
    from fxmem.api.optimize import floor
    from fxmem.levers.sparse.sparsify import sparsify

    trial = copy.deepcopy(model)
    sparsify(trial, density, **sparsify_options)
    opt = None if optimizer is None else type(optimizer)(trial.parameters(), **optimizer.defaults)
    return floor(trial, *args, optimizer=opt, **options, **kwargs)


def least_sparsity(model: nn.Module, budget: int | str, args: Sequence = (),
                   kwargs: Mapping | None = None, *,
                   optimizer: torch.optim.Optimizer | None = None,
                   densities: Sequence[float] = DENSITIES,
                   sparsify_options: Mapping | None = None, **options) -> DensityChoice:
    """The largest of ``densities`` at which ``fxmem.floor`` of the sparsified model on
    ``model(*args, **kwargs)`` is within ``budget``; ``options`` are :func:`fxmem.floor`'s
    (``allow``, ``lowering``, ``time_limit``...), ``sparsify_options`` are
    :func:`~fxmem.levers.sparse.sparsify`'s. ``model`` is not changed (copies are planned).
    A :class:`fxmem.BudgetError` with the smallest floor when no density fits."""
    budget = parse_budget(budget)
    floors: dict[float, int] = {}
    for density in sorted(densities, reverse=True):
        floors[density] = _floor_at(model, density, tuple(args), dict(kwargs or {}), optimizer,
                                    dict(sparsify_options or {}), options)
        log.info("density %.3f: floor %s", density, format_bytes(floors[density]))
        if floors[density] <= budget:
            return DensityChoice(density, floors[density], floors)
    best = min(floors.values())
    raise BudgetError(
        f"no density in {sorted(densities)} meets the budget of {format_bytes(budget)}: the "
        f"sparsest ({min(densities)}) needs {format_bytes(floors[min(densities)])}", floor=best)
