"""Plan a joint graph under a byte budget: ask the levers, solve, apply, check, record.

1. Label the joint graph (:func:`fxmem.graph.joint.step_from_joint`).
2. The recompute lever analyses it into a problem on plain data (priced by the cost model, its
   memory by the same storage table and lowering rules as the check below) and solves it.
3. The lever applies the decision (the recompute split, then RNG replay: recorded passes); the
   forward and backward graphs are simulated with the memory model -- the exact check. Where the
   simulated peak is over the limit, what the linear model missed is fed back and the solver
   runs again (:mod:`fxmem.levers.recompute.fit`; the plan counts its solver calls).

A budget at or above the unoptimised peak recomputes nothing. A budget under the smallest peak
any plan reaches raises :class:`BudgetError` naming that floor and what holds it. Microbatching
reaches the planner as context (the bytes it holds beyond the microbatch's graph); the precision
lever's compute casts reach it in the joint graph (the step is captured under autocast); the
sparse lever's layers too (the model is sparsified before capture, :mod:`fxmem.levers.sparse`).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
import torch.fx

from fxmem.budget import BudgetError, format_bytes
from fxmem.graph.joint import step_from_joint
from fxmem.levers.base import NOT_BUILT
from fxmem.levers.recompute.fit import Realised, descend, fit, smallest_peak
from fxmem.levers.precision.stored import (PASS_NAME as STORED_LOW, offer_stored_low,
                                           record_stored, unwind_unsaved)
from fxmem.levers.recompute.lever import Applied, RecomputeLever
from fxmem.memory.simulation import MemoryTimeline, simulate
from fxmem.memory.storages import plan_storages
from fxmem.passes.base import PassRecord, StepGraphs
from fxmem.passes.recompute import RecomputeRecord
from fxmem.planning.options import LEVERS, PlanOptions, StepContext, default_margin
from fxmem.solver import save_all
from fxmem.solver.result import RecomputeSolution

__all__ = ["Plan", "PlanOptions", "StepContext", "plan_joint", "prepare_joint", "PreparedJoint",
           "default_margin", "LEVERS", "optimizer_bytes"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Plan:
    """The decision for one input signature and what it predicts. ``provenance`` records every
    pass that rewrote the graphs, with the graphs' code before and after it; ``solver_calls``
    counts the solves the plan took (the fitting rounds and the floor search)."""

    options: PlanOptions
    context: StepContext
    solution: RecomputeSolution
    record: RecomputeRecord
    predicted_peak: int
    unoptimized_peak: int
    timeline: MemoryTimeline
    graphs: dict[str, torch.fx.GraphModule]
    candidates: int
    plan_seconds: float
    solver_calls: int = 0
    provenance: tuple[PassRecord, ...] = ()
    microbatch: object | None = None  # fxmem.levers.microbatch.runtime.MicrobatchReport
    loss_scale: str | None = None  # fp16's loss scaling (fxmem.levers.precision.loss_scale)
    sparsity: object | None = None  # fxmem.levers.sparse.SparsityReport, when the lever sparsified
    notes: tuple[str, ...] = ()  # what the plan assumed that the user should know

    @property
    def budget(self) -> int:
        return self.options.budget

    def report(self) -> str:
        from fxmem.planning.report import format_plan

        return format_plan(self)


def plan_joint(
    joint: torch.fx.GraphModule,
    *,
    num_fwd_outputs: int,
    static_input_indices: set[int] | frozenset[int],
    options: PlanOptions,
    context: StepContext = StepContext(),
) -> Plan:
    """Plan ``joint`` (an AOTAutograd joint graph) under ``options.budget``, with what
    ``context`` holds beyond the graph."""
    prepared = prepare_joint(joint, num_fwd_outputs=num_fwd_outputs,
                             static_input_indices=static_input_indices, options=options,
                             context=context)
    from fxmem.planning.reuse import note_prepared

    note_prepared(prepared)  # the joint planner plans it again under other budgets
    return prepared.plan()


def prepare_joint(
    joint: torch.fx.GraphModule,
    *,
    num_fwd_outputs: int,
    static_input_indices: set[int] | frozenset[int],
    options: PlanOptions,
    context: StepContext = StepContext(),
) -> PreparedJoint:
    """What planning ``joint`` does before it looks at the budget (steps 1-2 up to the problem,
    and the unoptimised step realised): a :class:`PreparedJoint` to plan under any budget."""
    t0 = time.perf_counter()
    unapplied = set(options.allow) & set(NOT_BUILT)  # precision and sparse act at capture (the
    # step under autocast, the model's layers sparsified), so the joint graph holds what they did
    if unapplied:
        log.info("levers %s are not built yet; the plan does not use them", sorted(unapplied))
    offered, before = (), None
    if options.store_low is not None:  # the precision lever: saved values may be stored low
        before = {"joint": joint.code}
        offered = offer_stored_low(joint, num_fwd_outputs, options.store_low,
                                   eight_bit=options.store_8bit)
    step = step_from_joint(joint, num_fwd_outputs=num_fwd_outputs,
                           static_input_indices=static_input_indices)
    if options.safety_margin is None:
        options = dataclasses.replace(options, safety_margin=options.margin_for(step.device))
    pmap = RecomputeLever(options).analyse(step, context, stored_low=offered)
    prepared = PreparedJoint(joint, num_fwd_outputs, options, context, step, offered, before,
                             pmap)
    prepared.base = prepared.realise(save_all(pmap.problem, options.budget))
    prepared.seconds = time.perf_counter() - t0
    return prepared


_REALISED_KEPT = 8  # realised decisions a PreparedJoint keeps (a fitting round, the floor's
# passes and its descent often meet a decision again)


@dataclasses.dataclass(eq=False)
class PreparedJoint:
    """A joint graph ready to plan under any budget: labelled, the stored-low casts offered, the
    recompute problem built (costs, storage table, linear model: none depends on the budget) and
    the unoptimised step realised (``base``). ``plan(budget)`` is the rest of
    :func:`plan_joint`; the joint planner (:mod:`fxmem.planning.joint`) plans one capture under
    the budget, for its floor and with no limit. A decision is realised once (``realise`` keeps
    what each of the last few saved sets gave: the passes and the simulation are deterministic)."""

    joint: torch.fx.GraphModule
    num_fwd_outputs: int
    options: PlanOptions  # the safety margin resolved
    context: StepContext
    step: object  # fxmem.graph.capture.CapturedStep
    offered: tuple
    before: dict | None  # the joint graph's code before the stored-low casts were offered
    pmap: object  # fxmem.levers.recompute.problem.ProblemMap
    base: Realised | None = None
    seconds: float = 0.0  # spent preparing
    _realised: dict = dataclasses.field(default_factory=dict, repr=False)

    def realise(self, solution: RecomputeSolution) -> Realised:
        """The graphs ``solution``'s decision gives and their simulated memory."""
        key = solution.decision.saved.tobytes()
        done = self._realised.get(key)
        if done is not None:
            self._realised[key] = self._realised.pop(key)  # the most recent last
            return Realised(solution, done.applied, done.timeline)
        options, offered = self.options, self.offered
        lever = RecomputeLever(options)
        applied = lever.apply(StepGraphs(self.num_fwd_outputs, joint=self.joint),
                              lever.decision(self.pmap, solution, self.step))
        if offered:  # a value whose low copy is not saved is read as it is, not rounded
            stored = unwind_unsaved(applied.graphs.forward, applied.graphs.backward, offered)
            details = record_stored(stored, len(offered), options.store_low)
            unwound = {s.low for s in offered} - {s.low for s in stored}
            record = dataclasses.replace(applied.record, recomputed=tuple(
                n for n in applied.record.recomputed if n not in unwound))
            pass_record = PassRecord(STORED_LOW, details.summary(), details, self.before,
                                     {"forward": applied.graphs.forward.code,
                                      "backward": applied.graphs.backward.code})
            applied = Applied(applied.graphs, (*applied.records, pass_record), record)
        storages = plan_storages(self.step, applied.graphs.forward, applied.graphs.backward,
                                 num_fwd_outputs=self.num_fwd_outputs, lowering=options.lowering)
        context = self.context
        realised = Realised(solution, applied, simulate(
            storages, constant=context.constant, epilogue=context.epilogue_points,
            backward_constant=context.backward_constant))
        self._realised[key] = realised
        if len(self._realised) > _REALISED_KEPT:  # each holds its graphs: the oldest goes
            del self._realised[next(iter(self._realised))]
        return realised

    def plan(self, budget: int | None = None) -> Plan:
        """The plan under ``budget`` (default: the options' own); a BudgetError with the floor
        when none fits."""
        t0 = time.perf_counter()
        options = self.options
        base = self.base
        if budget is not None and budget != options.budget:
            options = dataclasses.replace(options, budget=int(budget))
            base = Realised(save_all(self.pmap.problem, options.budget), base.applied,
                            base.timeline)
        lever = RecomputeLever(options)
        chosen = _choose(self.pmap, lever, self.realise, base, options)
        graphs = {"joint": self.joint, "forward": chosen.applied.graphs.forward,
                  "backward": chosen.applied.graphs.backward}
        return Plan(options=options, context=self.context, solution=chosen.solution,
                    record=chosen.applied.record, predicted_peak=chosen.peak,
                    unoptimized_peak=base.peak, timeline=chosen.timeline, graphs=graphs,
                    candidates=self.pmap.problem.num_candidates,
                    plan_seconds=self.seconds + time.perf_counter() - t0,
                    solver_calls=lever.solves, provenance=chosen.applied.records)


def _choose(pmap, lever: RecomputeLever, realise, base: Realised, options: PlanOptions) -> Realised:
    """The realised plan to run: the unoptimised step when it fits, else the cheapest fitting
    recomputation; a BudgetError with the floor when none fits."""
    unoptimized = base.peak
    # the simulated peak must leave the margin free: room for what the memory model misses
    limit = int(options.budget * (1.0 - options.safety_margin))
    if unoptimized <= limit:
        return base
    if "recompute" not in options.allow:
        if unoptimized <= options.budget:
            log.warning("without recomputation the step needs %s, under the budget of %s but "
                        "not under its %.0f%% planning margin", format_bytes(unoptimized),
                        format_bytes(options.budget), 100 * options.safety_margin)
            return base
        raise BudgetError(
            f"the step needs {format_bytes(unoptimized)} without recomputation, over the budget "
            f"of {format_bytes(options.budget)}, and allow= does not include 'recompute'",
            floor=unoptimized, holders=base.timeline.breakdown(), unoptimized=unoptimized)
    best, missed = fit(pmap, lever, realise, limit, budget=options.budget,
                       max_rounds=options.max_rounds)
    if best is not None:
        return best
    # the linear model misled the solver: the smallest-peak plan, first as a 1-byte budget finds
    # it (the floor BudgetError reports: a budget over it must fit), then fed with what the
    # rounds' plans missed
    floor = smallest_peak(pmap, lever, realise, np.zeros_like(missed), limit)
    if floor.peak > limit and missed.any():
        fed = smallest_peak(pmap, lever, realise, missed, limit)
        floor = min(floor, fed, key=lambda r: r.peak)
    if floor.peak <= limit:
        return floor
    floor = descend(pmap, lever, realise, floor, budget=options.budget)
    if floor.peak <= limit:
        return floor
    if unoptimized <= options.budget:  # at or above the unoptimised peak: as it is
        log.warning("no plan leaves the %.0f%% planning margin under the budget of %s; at or "
                    "above the unoptimised peak (%s), nothing is recomputed",
                    100 * options.safety_margin, format_bytes(options.budget),
                    format_bytes(unoptimized))
        return base
    raise _budget_error(min(floor.timeline, base.timeline, key=lambda t: t.peak), options,
                        unoptimized)


def _budget_error(timeline: MemoryTimeline, options: PlanOptions, unoptimized: int) -> BudgetError:
    """The error for a budget under the smallest peak found, as the budget that would be met
    (the planning margin included) and what holds it."""
    floor = int(-(-timeline.peak // (1.0 - options.safety_margin)))
    holders = {k: v for k, v in timeline.breakdown().items() if v}
    held = " + ".join(f"{k} {format_bytes(v)}" for k, v in
                      sorted(holders.items(), key=lambda kv: -kv[1]))
    return BudgetError(
        f"no plan fits the budget of {format_bytes(options.budget)} "
        f"(strategy {options.strategy}): the smallest feasible budget is about "
        f"{format_bytes(floor)} ({floor} bytes), held at its peak by {held}; with nothing "
        f"recomputed the step needs {format_bytes(unoptimized)}",
        floor=floor, holders=holders, unoptimized=unoptimized,
    )


def optimizer_bytes(optimizer, grad_params) -> tuple[int, int]:
    """(state bytes, step temporaries) of an optimizer."""
    from fxmem.memory.optimizer import optimizer_memory

    if optimizer is None:
        return 0, 0
    with_grad = {id(p) for p in grad_params}
    mem = optimizer_memory(optimizer, has_grad=lambda p: id(p) in with_grad)
    return mem.state_bytes, mem.step_peak_bytes
