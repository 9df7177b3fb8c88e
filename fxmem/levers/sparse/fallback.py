"""Sparse weights last: only when the other allowed levers cannot meet the budget.

``fxmem.optimize(model, budget, allow=(..., "sparse"))`` plans the step with the other allowed
levers first -- the exact ones, then bf16 compute if ``"precision"`` is allowed
(:func:`~fxmem.levers.precision.fallback.exact_first`): the least lossy first. Only when that
raises :class:`~fxmem.budget.BudgetError` does it look for the least sparsity that meets the
budget, among :data:`DENSITIES` (0.5, 0.3, 0.2, 0.1, 0.05: :data:`MIN_DENSITY` is the sparsest):

1. the sparsest density is planned first: if even it does not fit, the BudgetError's ``floor``
   is the lower of the other levers' floor and its floor (fewer non-zeros never hold more:
   parameters, gradients, optimizer state and index buffers shrink, the transient dense weight
   of a layer stays), so no other density is planned;
2. otherwise the densities are planned from the largest down, and the first whose plan fits is
   the one used (the sparsest when no larger one fits).

At each density the step is planned with the other levers as above (exact first, then bf16),
at the budget itself (not compared with a floor: a time-limited solve that meets a floor may not
meet a budget just above it), on the module's own options and optimizer.

**The user's model.** A density is tried by sparsifying the model *in place* (with the user's
optimizer: its param groups then hold the layers' values, their state read at the kept positions,
see :func:`~fxmem.levers.sparse.optim.rebind_optimizer`), planning without running anything, and
putting back exactly what was there: the same dense layer objects, param groups and optimizer
state (no copy of the model is made, so no second copy of its parameters is allocated). Only
the density chosen is kept, and only once the step planned on it fits; so a plan that ends in
BudgetError, ``OptimizedModule.plan_for`` and :func:`fxmem.floor` leave the model and the
optimizer as they were. When the step runs, the model keeps its sparse layers
(``model.sparsity`` is their schedule; ``fxmem.to_dense(model)`` exports a dense copy) and the
user's loop steps the values with its own optimizer object. The plans other input signatures
made for the dense model are dropped; later ones are planned on the sparse model.

``sparse_density=d`` forces density ``d`` whatever the budget (like ``precision="bf16"``), the
other levers planning on top. A model that already has sparse layers (sparsified by the user, or
by this lever for another input signature) is not sparsified again.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

from fxmem.budget import BudgetError, format_bytes
from fxmem.levers.sparse.density import eligible_layers
from fxmem.levers.sparse.lever import SparseLever
from fxmem.levers.sparse.sparsify import _set_module, sparse_layers, sparsify

__all__ = ["SPARSE", "DENSITIES", "MIN_DENSITY", "SparseChoice", "SparseFallback",
           "check_sparse_density", "combined_sparse_error"]

log = logging.getLogger(__name__)

SPARSE = "sparse"
DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05)  # tried when the budget needs the lever, largest first
MIN_DENSITY = min(DENSITIES)
T = TypeVar("T")


def check_sparse_density(density: float | None, allow) -> float | None:
    """The density ``sparse_density`` forces (None: the planner's choice). Forcing needs
    ``"sparse"`` in ``allow``: it is a lossy lever, opt-in."""
    if density is None:
        return None
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"sparse_density must be a number in (0, 1) (the fraction of the "
                        f"sparsified layers' weights kept) or None, got {density!r}")
    if not 0.0 < float(density) < 1.0:
        raise ValueError(f"sparse_density must be in (0, 1), the fraction of the sparsified "
                         f"layers' weights kept (e.g. 0.1 keeps 10%), got {density!r}")
    if SPARSE not in allow:
        raise ValueError(f"sparse_density={density!r} sparsifies the model's weights, a lossy "
                         "lever: allow it with allow=(..., 'sparse')")
    return float(density)


@dataclasses.dataclass(frozen=True)
class SparseChoice:
    """The density the lever used and why; ``floors``: the floor (bytes) of each density tried
    whose plan did not fit."""

    density: float
    reason: str
    floors: Mapping[float, int | None] = dataclasses.field(default_factory=dict)


def combined_sparse_error(other: BudgetError, sparse: BudgetError,
                          density: float) -> BudgetError:
    """One BudgetError for a budget neither the other levers nor sparse weights at ``density``
    meet: its floor the lower of the two, its holders that floor's, ``unoptimized`` the
    other levers' (the dense step's)."""
    floors = [f for f in (other.floor, sparse.floor) if f is not None]
    floor = min(floors) if floors else None
    holders = sparse.holders if floor is not None and floor == sparse.floor else other.holders
    if floor is not None and floor == other.floor and floor != sparse.floor:  # dense is lower
        message = (f"{other}\n(with the model sparsified at density {density:g}, the sparse "
                   "lever's sparsest: "
                   + (f"smallest feasible budget {format_bytes(sparse.floor)}, {sparse.floor} "
                      "bytes, higher)" if sparse.floor is not None else "no floor known)"))
    else:
        message = (f"{sparse}\n(with the model sparsified at density {density:g}, the sparse "
                   "lever's sparsest; without it: "
                   + (f"smallest feasible budget {format_bytes(other.floor)}, {other.floor} "
                      "bytes)" if other.floor is not None else "no floor known)"))
    return BudgetError(message, floor=floor, holders=holders,
                       unoptimized=other.unoptimized if other.unoptimized is not None
                       else sparse.unoptimized)


def _sparsify_in_place(model: nn.Module, density: float,
                       optimizer: torch.optim.Optimizer | None,
                       example: tuple[tuple, dict] | None = None) -> Callable[[], None]:
    """Sparsify ``model`` at ``density`` (``optimizer`` rebound to the values; each layer's
    kernel, sparse product or transient dense weight, the faster measured on the input shape
    one forward of ``example`` gives it; without one, the transient dense weight) and return
    what puts back the dense layers, the param groups and the optimizer state exactly."""
    layers = eligible_layers(model)  # what sparsify replaces with its defaults
    had = "sparsity" in model.__dict__
    old_sparsity = model.__dict__.get("sparsity")
    params = state = None
    if optimizer is not None:
        params = [list(g["params"]) for g in optimizer.param_groups]
        state = dict(optimizer.state)

    def undo() -> None:
        for name, layer in layers.items():
            _set_module(model, name, layer)
        if optimizer is not None:
            for group, kept in zip(optimizer.param_groups, params):
                group["params"][:] = kept
            optimizer.state.clear()
            optimizer.state.update(state)
        if had:
            model.__dict__["sparsity"] = old_sparsity
        else:
            model.__dict__.pop("sparsity", None)

    try:
        if example and (example[0] or example[1]):
            sparsify(model, density, optimizer=optimizer, kernel="auto",
                     example_inputs=example[0], example_kwargs=example[1])
        else:
            sparsify(model, density, optimizer=optimizer)
    except BaseException:
        undo()
        raise
    return undo


class SparseFallback:
    """What the sparse lever does for one :class:`~fxmem.api.optimize.OptimizedModule`:
    ``forced`` is ``sparse_density`` (or None); ``choice`` is set once the model was sparsified
    by the lever."""

    def __init__(self, forced: float | None = None):
        self.forced = forced
        self.choice: SparseChoice | None = None
        self._probing = False
        self._example: tuple[tuple, dict] | None = None

    def plan(self, module, planned: Callable[[], T], args: tuple, kwargs: dict, *,
             runs: bool) -> T:
        """``planned()`` -- the step planned with the other allowed levers (and, with ``runs``,
        compiled and run: ``OptimizedModule.forward``; without, the :class:`Plan` of
        ``plan_for``) -- or, if it raises BudgetError and ``"sparse"`` is allowed, the same on
        the model sparsified at the least sparsity that fits (see the module's docstring)."""
        if self._probing or (SPARSE not in module._options.allow and self.forced is None):
            return planned()
        self._example = (tuple(args), dict(kwargs))  # each layer's kernel is timed on it
        if self.choice is not None:  # sparsified by the lever already: plan it as it is
            out = planned()
            lever = SparseLever(self.choice.density, self.choice.reason)
            lever.annotate(module.plan if runs else out,
                           lever.analyse(module.module, module.optimizer))
            return out
        model = module.module
        if self.forced is not None:
            if sparse_layers(model):
                raise ValueError(f"sparse_density={self.forced:g}: the model has sparse layers "
                                 "already (fxmem.sparsify); leave sparse_density out")
            return self._use(module, SparseChoice(
                self.forced, f"Forced by sparse_density={self.forced:g}"), planned, runs)
        try:
            return planned()
        except BudgetError as other:
            if sparse_layers(model):
                log.info("fxmem: the model has sparse layers already; the sparse lever does not "
                         "sparsify it again")
                raise
            if not eligible_layers(model):
                log.info("fxmem: no layer to sparsify (nn.Linear, nn.Conv2d; the first and last "
                         "weight layers stay dense); the sparse lever cannot help")
                raise
            choice, plan = self._search(module, other, args, kwargs)
        if not runs:  # the plan made on the model sparsified at that density; model put back
            SparseLever(choice.density, choice.reason).annotate(plan, plan.sparsity)
            return plan
        return self._use(module, choice, planned, runs)

    # ------------------------------------------------------------------ the search
    def _probe(self, module, density: float, args, kwargs):
        """The plan of the step on the model sparsified at ``density`` (its ``sparsity`` the
        model's report at that density; the model and optimizer put back afterwards), or the
        BudgetError it raised."""
        undo = _sparsify_in_place(module.module, density, module.optimizer, (args, kwargs))
        self._probing = True
        try:
            plan = module.plan_for(*args, **kwargs)
            plan.sparsity = SparseLever(density).analyse(module.module, module.optimizer)
            return plan
        except BudgetError as err:
            return err
        finally:
            self._probing = False
            undo()

    def _search(self, module, other: BudgetError, args, kwargs):
        """The least sparsity whose plan fits, and that plan; a BudgetError with the lowest
        floor when even the sparsest does not fit."""
        budget = module._options.budget
        needs = (f"{format_bytes(other.floor)} ({other.floor} bytes)" if other.floor is not None
                 else "more than the budget")
        log.info("fxmem: the other allowed levers do not fit (%s); looking for the least "
                 "sparsity that does among densities %s", str(other).splitlines()[0], DENSITIES)
        floors: dict[float, int | None] = {}
        found = self._probe(module, MIN_DENSITY, args, kwargs)
        if isinstance(found, BudgetError):
            raise combined_sparse_error(other, found, MIN_DENSITY) from None
        chosen = MIN_DENSITY
        for density in sorted(DENSITIES, reverse=True):
            if density == MIN_DENSITY:
                break
            result = self._probe(module, density, args, kwargs)
            if not isinstance(result, BudgetError):
                chosen, found = density, result
                break
            floors[density] = result.floor
        tried = ", ".join(f"{d:g} (floor {format_bytes(f)})" if f is not None else f"{d:g}"
                          for d, f in floors.items())
        reason = (f"Used because the budget {format_bytes(budget)} is under what the other "
                  f"allowed levers need, {needs}; density {chosen:g} is the largest of "
                  f"{', '.join(f'{d:g}' for d in DENSITIES)} whose plan fits"
                  + (f" (over it: {tried})" if tried else ""))
        log.info("fxmem: %s", reason)
        return SparseChoice(chosen, reason, floors), found

    # ------------------------------------------------------------------ applying a choice
    def _use(self, module, choice: SparseChoice, planned, runs: bool):
        """``planned()`` on the model sparsified at ``choice.density``: kept sparse when the step
        runs and fits; put back as it was otherwise (a BudgetError, or only a plan asked)."""
        model, optimizer = module.module, module.optimizer
        lever = SparseLever(choice.density, choice.reason)
        undo = _sparsify_in_place(model, choice.density, optimizer, self._example)
        if not runs:
            try:
                plan = planned()
                lever.annotate(plan, lever.analyse(model, optimizer))
                return plan
            finally:
                undo()
        # the plans made for the dense model are dropped (kept aside until the step fits)
        dense_plans, last = dict(module._compiled), module._last
        module._compiled.clear()
        module._last = None
        try:
            out = planned()
        except BaseException:
            undo()
            module._compiled.update(dense_plans)
            module._last = last
            raise
        self.choice = choice
        log.info("fxmem: the model is sparsified at density %g", choice.density)
        lever.annotate(module.plan, lever.analyse(model, optimizer))
        return out
