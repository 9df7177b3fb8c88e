"""The recompute lever: save some forward values for the backward and recompute the rest.

- analyse: the joint graph -> a :class:`~fxmem.solver.RecomputeProblem` (plain data, through
  :func:`fxmem.levers.recompute.problem.build_problem`), priced by the cost model;
- solve: any strategy (ILP, greedy, checkpoint-blocks, save-all) -> one result type;
- apply: the recompute split, then RNG replay of the random ops the backward recomputes -- two
  recorded passes.

Exact: recomputed values equal the forward's, random ones included.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from fxmem.cost.model import compute_time, graph_costs, profile_costs, spec_for
from fxmem.graph.capture import CapturedStep
from fxmem.levers.base import Lever, register
from fxmem.levers.recompute.problem import ProblemMap, build_problem, saved_nodes
from fxmem.passes.base import PassRecord, StepGraphs
from fxmem.passes.recompute import RecomputeRecord, RecomputeSplit, SaveDecision
from fxmem.passes.rng_replay import RngReplay
from fxmem.planning.options import PlanOptions, StepContext
from fxmem.solver import checkpoint_blocks, greedy, min_peak, save_all, solve_ilp
from fxmem.solver.result import RecomputeSolution

__all__ = ["RecomputeLever", "Applied"]


@dataclasses.dataclass(frozen=True)
class Applied:
    """A decision carried out: the forward and backward graphs, the passes' records, and the
    recompute pass's record with the random ops replayed."""

    graphs: StepGraphs
    records: tuple[PassRecord, ...]
    record: RecomputeRecord


@register
class RecomputeLever(Lever):
    name = "recompute"
    exact = True

    def __init__(self, options: PlanOptions):
        self.options = options
        self.solves = 0  # solver calls made (the planner's rounds)

    def analyse(self, step: CapturedStep, context: StepContext, stored_low=()) -> ProblemMap:
        """The recompute problem of ``step`` (an AOTAutograd joint graph, labelled), with what
        the context holds throughout and after the backward. ``stored_low``: the values the
        solver may store in fewer bits (:func:`fxmem.levers.precision.stored.offer_stored_low`),
        whose low copies are candidates that cost their casts' time to save."""
        from fxmem.levers.precision.stored import save_costs
        from fxmem.levers.precision.stored_8bit import free_nodes, interior_nodes

        spec = self.options.device_spec or spec_for(step.device)
        costs = profile_costs(step.gm, step.device) if self.options.cost == "profile" \
            else graph_costs(step.gm, spec)
        fused_cost = functools.partial(compute_time, spec=spec)
        free = free_nodes(s.eight_bit for s in stored_low)  # 8 bits: priced as storing's
        if free:
            fused_cost = functools.partial(_unless_free, free=free, cost=fused_cost)
        pmap = build_problem(step, costs, save_cost=save_costs(stored_low, costs),
                             saveable=frozenset(s.value for s in stored_low),
                             constant=context.constant,
                             epilogue=context.epilogue_points,
                             backward_constant=context.backward_constant, replay_random=True,
                             lowering=self.options.lowering,
                             fused_cost=fused_cost)
        if not free:
            return pmap
        return _eight_bit_terms(pmap, free, interior_nodes(s.eight_bit for s in stored_low))

    def solve(self, problem, target: int) -> RecomputeSolution:
        """The least predicted recompute time under ``target`` bytes, by the strategy asked."""
        self.solves += 1
        strategy, options = self.options.strategy, self.options
        if strategy == "ilp":
            return solve_ilp(problem, target, time_limit=options.time_limit, gap=options.gap)
        if strategy == "greedy":
            return greedy(problem, target)
        if strategy == "checkpoint-blocks":
            return checkpoint_blocks(problem, target)
        return save_all(problem, target)

    def smallest_peak(self, problem) -> RecomputeSolution:
        """The decision with the smallest predicted peak (for the floor a BudgetError names)."""
        self.solves += 1
        return min_peak(problem, time_limit=self.options.time_limit, gap=0.01)

    def apply(self, graphs: StepGraphs, decision: SaveDecision) -> Applied:
        """Split the joint graph saving ``decision.saved``; replay recomputed random ops."""
        split, split_record = RecomputeSplit()(graphs, decision)
        replayed, replay_record = RngReplay()(split, None)
        record = dataclasses.replace(split_record.details,
                                     replayed=replay_record.details.replayed)
        return Applied(replayed, (split_record, replay_record), record)

    @staticmethod
    def decision(pmap: ProblemMap, solution: RecomputeSolution,
                 step: CapturedStep) -> SaveDecision:
        """The save decision a solution makes, in node names."""
        return SaveDecision(saved=tuple(saved_nodes(pmap, solution.decision.saved)),
                            buffers=tuple(step.buffer_names))


def _unless_free(node, *, free: frozenset[str], cost) -> float:
    """``cost(node)``, or 0 for a node whose time is charged elsewhere."""
    return 0.0 if node.name in free else cost(node)


def _eight_bit_terms(pmap: ProblemMap, free: frozenset[str],
                     interior: frozenset[str]) -> ProblemMap:
    """``pmap`` with the ``free`` candidates' recomputation holding no memory -- a plan never
    runs the 8-bit quantisation in the backward (where the codes are not saved, the backward
    reads the bf16 copy or the value itself instead, :func:`~fxmem.levers.precision.
    stored_8bit.unwind_8bit`), so the bytes it would hold there must not steer the solver away
    from those choices -- and the ``interior`` ones never saved (fewer decisions)."""
    p = pmap.problem
    mask = np.array([name in free for name in p.names], dtype=bool)
    inner = np.array([name in interior for name in p.names], dtype=bool) & ~p.must_save
    problem = dataclasses.replace(p, again_size=np.where(mask, 0, p.again_size),
                                  transient=np.where(mask, 0, p.transient),
                                  never_save=p.never_save | inner)
    return dataclasses.replace(pmap, problem=problem)
