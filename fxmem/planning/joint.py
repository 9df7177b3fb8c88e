"""The joint planner: every combination of the allowed levers' settings planned under one budget.

``fxmem.optimize`` chooses its levers in a fixed ladder (exact levers, then bf16 compute, then
sparse weights). :func:`explore` instead plans each combination of

- the microbatch count k: 1 and, with ``"microbatch"`` allowed on a step the microbatch lever
  can split, the counts it considers (:func:`~fxmem.levers.microbatch.choice.candidate_ks`, powers
  of two up to the batch found by its batch analysis);
- the compute precision: fp32, and bf16 with ``"precision"`` allowed (saved values may then be
  stored in bf16 too, as ``optimize(precision="bf16")`` does);
- the weights: dense, and with ``"sparse"`` allowed each of ``densities`` (sparsified on a deep
  copy of the model and optimizer, never the user's),

with those settings forced (``OptimizedModule.plan_for``: recomputation chosen by the planner on
top, when ``"recompute"`` is allowed), and keeps every point: its levers, the planner's predicted
peak, its predicted step time (:func:`plan_seconds`), whether it changes numerics, whether it fits.

**What is planned per combination.** Each combination is captured once, as ``fxmem.optimize``
would capture it (``plan_for`` with its settings forced: the step's Dynamo+AOTAutograd capture,
and for k > 1 the microbatch lever's decision), and planned under the budget. A combination that
fits is planned again under a 1-byte budget for its floor (the :class:`BudgetError`'s, with
``floors=True``); one that does not fit has its floor from that error and is planned once more
with no limit (nothing recomputed), so the point says what the combination costs with enough
memory. Those further plans reuse the capture: the planner's preparation of its joint graph
(:class:`~fxmem.planning.planner.PreparedJoint`: the graph labelled, stored-low casts offered,
the recompute problem built, the unoptimised step realised; none of it depends on the budget)
is planned under the other budget, as a fresh capture would be planned. Shared across
combinations (:mod:`fxmem.planning.reuse`): the microbatch lever's batch analysis (one make_fx
capture of the whole step per precision and density, not one per k and plan) and, per density,
the deep copy of the model sparsified once (its layers' kernels timed once) for all its k and
precisions. Within one precision and density, larger k are not planned once a k fits with
nothing recomputed (the microbatch lever's rule: a larger k only adds per-op overhead; the
points it would give are slower). Solver time limits are ``time_limit`` seconds per solve.
``bench/joint_planning_time.py`` times it on GPT-2 small (124M parameters) with all four levers,
phase by phase (``bench/results/joint_planning_time.md``).

**The choice.** The fastest point that fits; lossy points only when no exact one fits; among points
within 1% of the fastest, the least lossy (the ladder's order: bf16 compute, then sparser weights),
then the fastest, then the smallest. With ``prefer="time"`` lossy points compete with exact ones
on time (the least lossy within 1% of the fastest): the choice's predicted time then never rises
with the budget, where the exact preference trades a faster lossy point for a slower exact one
as soon as one fits. Predicted times are :func:`plan_seconds` (:mod:`fxmem.cost.step`: matrix
products measured on the device, pointwise ops priced as fused, the microbatch loop's costs). The **front** holds the points no other point matches or
beats in peak, time and lossiness at once (strictly beating it in one): it contains the chosen
point. The **floor** is the smallest floor of any combination planned (None when some fitting
combination's floor was not searched, ``floors=False``).

**Searching less.** ``search="needed"`` plans the exact combinations first (fp32, dense weights,
every k) and the lossy ones only when none of them fits: the choice is the same (a lossy point is
chosen only when no exact one fits), the alternatives and the front are the exact points, and the
floor is None (the lossy combinations' floors are not searched).

The points, the choice, the front, the table of alternatives and the plot are plain functions of
the points, in :mod:`fxmem.planning.front` (re-exported here).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable

import torch

from fxmem.budget import BudgetError, format_bytes, parse_budget
from fxmem.cost.model import DeviceSpec, spec_for
from fxmem.cost.step import StepCosts, graph_device, step_seconds
from fxmem.errors import FxmemError
from fxmem.graph.torch_compat import pytree
from fxmem.planning.front import (PREFER, TIE, JointExploration, JointPoint, choose, forced,
                                  format_alternatives, pareto_front, plot_pareto)
from fxmem.planning.options import EXACT_LEVERS, PlanOptions, check_allow

__all__ = ["JointPoint", "JointExploration", "explore", "choose", "pareto_front", "plan_seconds",
           "forced", "format_alternatives", "plot_pareto", "DENSITIES", "TIE", "PREFER"]

log = logging.getLogger(__name__)

DENSITIES = (0.5, 0.2, 0.1)  # the sparse densities tried by default
_NO_LIMIT = 2**62  # a budget no step reaches: the plan saves everything


def plan_seconds(plan, spec: DeviceSpec | None = None, *, microbatches: int | None = None,
                 costs: StepCosts | None = None) -> float:
    """A plan's predicted step time (seconds): :func:`fxmem.cost.step.step_seconds` of its
    forward and backward graphs -- recomputed ops are in the backward graph -- run once per
    microbatch (the first microbatch's graphs: a smaller last one is counted as a full one), with
    the microbatch loop's own costs. Matrix products (and the sparse lever's CSR products) are
    measured on the plan's device, once per signature in the process; other ops are priced as
    fused under Inductor lowering (each its own kernel under eager lowering); see
    :mod:`fxmem.cost.step`. Not counted: the optimizer's step. ``spec``: the roofline for what is
    not measured (default: the plan's ``device_spec`` or the device's); ``costs``: the pricing
    (default: :class:`~fxmem.cost.step.StepCosts` for the plan's lowering). ``microbatches``: k,
    for a plan that does not say (one made by :meth:`~fxmem.planning.planner.PreparedJoint.plan`
    directly); by default the plan's own (1 when it has no microbatch report)."""
    graphs = [plan.graphs["forward"], plan.graphs["backward"]]
    if costs is None:
        costs = StepCosts(lowering="inductor" if plan.options.lowering == "inductor" else "eager")
    spec = spec or costs.spec or plan.options.device_spec or spec_for(graph_device(graphs[0]))
    k = microbatches
    if k is None:
        k = len(plan.microbatch.sizes) if plan.microbatch is not None else 1
    return step_seconds(graphs, microbatches=k, costs=costs, spec=spec)


SEARCHES = ("all", "needed")


def explore(model: torch.nn.Module, *args, budget: int | str,
            allow: Iterable[str] = EXACT_LEVERS, optimizer: torch.optim.Optimizer | None = None,
            loss_fn: Callable[..., torch.Tensor] | None = None, lowering: str = "inductor",
            time_limit: float = 3.0, progress: bool = True,
            densities: Iterable[float] = DENSITIES, floors: bool = True, search: str = "all",
            prefer: str = "exact", **kwargs) -> JointExploration:
    """Plan ``model``'s step on these inputs (``kwargs`` are the model's) under ``budget`` for
    every combination of the allowed levers' settings, and choose one (see the module's
    docstring). The model and the optimizer are left as they were. ``progress``: a tqdm bar.
    ``search="needed"`` plans the lossy combinations only when no exact one fits (the choice is
    the same: a lossy point is chosen only then; the front and the floor are then those of the
    exact combinations, the floor None); ``"all"`` (default) plans every combination.
    ``prefer``: how the point is chosen (:func:`choose`); ``search="needed"`` needs "exact"."""
    from fxmem.planning import reuse

    _check_choice(search, prefer)
    t0 = time.perf_counter()
    budget = parse_budget(budget)
    allow = check_allow(allow)
    precisions = ("fp32", "bf16") if "precision" in allow else ("fp32",)
    bar = _bar(progress, len(precisions))  # its total is known once the k are
    lossy_skipped = False
    with reuse.session():
        if bar is not None and "microbatch" in allow:
            bar.set_postfix_str("the batch analysis (microbatch counts)")
        with reuse.scope(("fp32", None)):  # the dense fp32 step's analysis serves its k > 1
            ks, skipped = _microbatch_counts(model, args, kwargs, allow, lowering, loss_fn)
        dens = _densities(model, allow, densities, skipped)
        if bar is not None:  # search="needed": one tier of k at a time, grown as tiers are
            bar.total = len(ks) if search == "needed" else len(dens) * len(precisions) * len(ks)
            bar.refresh()
        points: list[JointPoint] = []

        def enough() -> bool:  # the exact combinations come first in the ladder's order
            return search == "needed" and any(p.exact and p.fits for p in points)

        copy_of = None  # one deep copy for every density, sparsified at each in turn, put back
        for density in dens:  # the ladder's order: each density, fp32 then bf16
            if enough():
                lossy_skipped = True
                break
            if density is not None and copy_of is None:
                copy_of = copy.deepcopy((model, optimizer))
            if bar is not None and density is not None:
                bar.set_postfix_str(f"density {density:g}: sparsifying (kernels timed)")
            with reuse.scope(("weights", density)), \
                    _weights(model, optimizer, copy_of, density, args, kwargs) as weights:
                for precision in precisions:
                    if enough():
                        lossy_skipped = True
                        break
                    if bar is not None and search == "needed" and points:  # the next tier
                        bar.total += len(ks)
                        bar.refresh()
                    with reuse.scope((precision, density)):
                        points += _variant(weights, precision, density, ks, allow, budget,
                                           floors, skipped, bar, dict(
                                               loss_fn=loss_fn, lowering=lowering,
                                               time_limit=time_limit), args, kwargs)
            if lossy_skipped:
                break
    if lossy_skipped:
        lossy = [n for n, on in (("bf16 compute", len(precisions) > 1),
                                 ("sparse weights", len(dens) > 1)) if on]
        skipped.append(f"{' and '.join(lossy)}: not planned (search='needed': an exact "
                       "combination fits, so the choice is exact)")
    if bar is not None:
        bar.update(bar.total - bar.n)
        bar.close()
    known = [p.floor for p in points]
    floor = min(known) if known and None not in known and not lossy_skipped else None
    return JointExploration(budget=budget, allow=tuple(sorted(allow)), points=tuple(points),
                            front=pareto_front(points), chosen=choose(points, prefer), floor=floor,
                            skipped=tuple(skipped), seconds=time.perf_counter() - t0)


def _check_choice(search: str, prefer: str) -> None:
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {PREFER}, got {prefer!r}")
    if search == "needed" and prefer != "exact":
        raise ValueError("search='needed' skips the lossy combinations once an exact one fits: "
                         "it needs prefer='exact'")


def _densities(model: torch.nn.Module, allow, densities: Iterable[float],
               skipped: list[str]) -> list[float | None]:
    """None (dense), then the densities explored, sparsest last; why none is, in ``skipped``."""
    dens: list[float | None] = [None]
    if "sparse" in allow:
        from fxmem.levers.sparse.density import eligible_layers

        if eligible_layers(model):
            dens += sorted({float(d) for d in densities}, reverse=True)
        else:
            skipped.append("sparse: no layer to sparsify (nn.Linear, nn.Conv2d; the first "
                           "and last weight layers stay dense)")
    return dens


class _Weights:
    """The model and optimizer a density's combinations are planned on, or why there are
    none (``error``: the model could not be sparsified at that density)."""

    def __init__(self, model, optimizer, error: str | None = None):
        self.model, self.optimizer, self.error = model, optimizer, error


@contextlib.contextmanager
def _weights(model, optimizer, copy_of, density: float | None, args, kwargs):
    """The user's model for dense weights; for a density, the deep copy sparsified at it once
    for all its combinations (as ``optimize(sparse_density=...)`` sparsifies it for each plan:
    :func:`fxmem.levers.sparse.fallback._sparsify_in_place`, each layer's kernel timed on the
    whole batch's input) and put back afterwards."""
    if density is None:
        yield _Weights(model, optimizer)
        return
    from fxmem.levers.sparse import fallback

    on, opt = copy_of
    if fallback.sparse_layers(on):  # as optimize(sparse_density=...) refuses it
        raise ValueError(f"sparse_density={density:g}: the model has sparse layers already "
                         "(fxmem.sparsify); leave sparse_density out")
    try:
        undo = fallback._sparsify_in_place(on, density, opt, (tuple(args), dict(kwargs)))
    except FxmemError as exc:
        yield _Weights(on, opt, str(exc).splitlines()[0])
        return
    try:
        yield _Weights(on, opt)
    finally:
        undo()


def _variant(weights: _Weights, precision: str, density: float | None, ks: list[int], allow,
             budget: int, floors: bool, skipped: list, bar, options: dict, args, kwargs
             ) -> list[JointPoint]:
    """The points of one precision and density, k = 1 first."""
    from fxmem.api.optimize import optimize

    def plan(k: int, limit: int):
        # the weights are sparsified already: the density is not forced again
        module = optimize(weights.model, limit, optimizer=weights.optimizer, **options,
                          **forced(k, precision, None, allow))
        return module.plan_for(*args, **kwargs)

    points = []
    for i, k in enumerate(ks):
        name = f"k={k} {precision}" + (f" density {density:g}" if density else "")
        if bar is not None:
            bar.set_postfix_str(name)
        point = None
        if weights.error is not None:
            skipped.append(f"{name}: {weights.error}")
        else:
            try:
                point = _point(plan, k, precision, density, budget, floors,
                               lambda stage, name=name: bar is not None
                               and bar.set_postfix_str(f"{name}: {stage}"))
            except FxmemError as exc:  # a split the step refuses, a capture that fails
                skipped.append(f"{name}: {str(exc).splitlines()[0]}")
        if bar is not None:
            bar.update(1)
        if point is None:
            continue
        points.append(point)
        log.info("fxmem joint planner: %s: peak %s, %.4g s, %s", name,
                 format_bytes(point.peak), point.seconds, "fits" if point.fits else "over")
        if point.fits and not point.recomputed and i + 1 < len(ks):
            skipped.append(f"{precision}" + (f" density {density:g}" if density else "")
                           + f": k > {k} not planned (k={k} fits with nothing recomputed)")
            if bar is not None:
                bar.update(len(ks) - i - 1)
            break
    return points


def _point(plan, k: int, precision: str, density: float | None, budget: int,
           floors: bool, stage=lambda stage: None) -> JointPoint:
    """One combination: planned under the budget; its floor; with no limit when it does not fit.
    The step is captured once: the floor's and the no-limit plan are the same capture planned
    under those budgets (:class:`~fxmem.planning.planner.PreparedJoint`)."""
    from fxmem.planning import reuse

    def point(p, fits: bool, floor: int | None) -> JointPoint:
        return JointPoint(k, precision, density, int(p.predicted_peak),
                          plan_seconds(p, microbatches=k), fits, floor, len(p.record.recomputed))

    stage("capture and plan under the budget")
    with reuse.recording() as prepared:
        try:
            at_budget, error = plan(k, budget), None
        except BudgetError as err:
            at_budget, error = None, err
    again = prepared[0] if len(prepared) == 1 else None

    def replan(limit: int):
        return again.plan(limit) if again is not None else plan(k, limit)

    if error is not None:
        stage("with no limit")
        return point(replan(_NO_LIMIT), False, error.floor)
    floor = None
    if floors:
        stage("its floor")
        try:
            replan(1)
            floor = 1  # a 1-byte budget met: nothing is held
        except BudgetError as err:
            floor = err.floor
        if floor is not None:
            floor = min(floor, budget)  # a time-limited search may find a higher one
    return point(at_budget, True, floor)


def _microbatch_counts(model, args, kwargs, allow, lowering, loss_fn) -> tuple[list[int], list]:
    """The k to plan (1 first) and, when only 1, why."""
    if "microbatch" not in allow:
        return [1], []
    from fxmem.levers.microbatch.choice import candidate_ks
    from fxmem.levers.microbatch.lever import MicrobatchLever

    lever = MicrobatchLever(model, PlanOptions(budget=1, allow=allow, lowering=lowering),
                            loss_fn=loss_fn)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    try:
        _, analysis = lever.analyse(leaves, spec)
    except FxmemError as exc:
        return [1], [f"microbatch: {str(exc).splitlines()[0]}"]
    if not lever.splittable(analysis):
        return [1], ["microbatch: the step cannot be split exactly (its loss is no mean or sum "
                     "over the batch, or its forward mixes samples)"]
    return candidate_ks(analysis.batch_size), []


def _bar(progress: bool, total: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the dev environment
        return None
    return tqdm(total=total, desc="fxmem: planning combinations", unit="plan", leave=False)
