"""Fit a recompute decision to the exact memory model.

The solver sees a linear model of the step's memory (:class:`~fxmem.solver.RecomputeProblem`);
the plan is checked by simulating the graphs the decision realises, with the same storage table
and lowering rules (:mod:`fxmem.memory.lowering`). What the linear model still cannot see -- how a
recomputed op lands among the backward's kernel groups and pooled buffers -- can put the simulated
peak over the limit. Then what the model missed is added to its base at the positions where it was
missed, and the solver runs again (a *round*; the plan's report counts them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from fxmem.levers.recompute.problem import ProblemMap
from fxmem.memory.simulation import MemoryTimeline

__all__ = ["Realised", "fit", "smallest_peak", "descend", "model_miss"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Realised:
    """A solution carried out and simulated: the solution, what its passes produced
    (:class:`~fxmem.levers.recompute.lever.Applied`), and the simulated timeline."""

    solution: Any  # fxmem.solver.RecomputeSolution
    applied: Any  # fxmem.levers.recompute.lever.Applied
    timeline: MemoryTimeline

    @property
    def peak(self) -> int:
        return self.timeline.peak


def fit(pmap: ProblemMap, lever, realise: Callable[[Any], Realised], limit: int, *,
        budget: int, max_rounds: int) -> tuple[Realised | None, np.ndarray]:
    """Solve, realise and simulate until the simulated peak is at most ``limit``; then spend what
    is left under it, recomputing less, while the plans get cheaper and still fit. Returns the
    cheapest fitting plan (or None) and what the model missed, per position (see
    :func:`model_miss`)."""
    problem, target = pmap.problem, limit
    missed = np.zeros(problem.num_positions, dtype=np.int64)  # what the model missed, where
    best = None
    for round_ in range(max_rounds):
        solution = lever.solve(problem, target)
        if not solution.feasible:
            break
        realised = realise(solution)
        log.debug("plan round %d: model peak %d, simulated %d, budget %d", round_,
                  solution.peak, realised.peak, budget)
        if realised.peak <= limit:
            if best is not None and best.solution.recompute_time <= solution.recompute_time:
                break
            best = realised
            # a plan far under the limit recomputes more than it must (the corrections below
            # hold for the decision they came from, not every other), and its peak can fall
            # under a tighter budget's: give the solver the slack
            if limit - realised.peak <= budget // 200:
                break
            target += limit - realised.peak
            continue
        if best is not None:  # spending the slack overshot: keep the plan that fit
            break
        # the simulated excess is where the linear model is low, often far from the model's own
        # peak: a lower target alone would not move it. Add the miss there, the largest seen at
        # each position, so the next round avoids it; and tighten by a growing step (0.25%,
        # 0.5%, ... of the budget) so a miss by a few bytes is not met again
        missed = np.maximum(missed, model_miss(pmap.problem, pmap.labels, solution.decision,
                                               realised.timeline))
        problem = with_missed(pmap, missed)
        target = limit - ((budget // 400) << round_)
    return best, missed


def smallest_peak(pmap: ProblemMap, lever, realise: Callable[[Any], Realised],
                  missed: np.ndarray, limit: int, passes: int = 3) -> Realised:
    """The realised plan with the smallest simulated peak found by the lever's smallest-peak
    solve, fed with what the model missed (``missed``, then for each pass's plan): the floor a
    BudgetError reports."""
    best = None
    for _ in range(passes):
        solution = lever.smallest_peak(with_missed(pmap, missed))
        realised = realise(solution)
        if best is None or realised.peak < best.peak:
            best = realised
        if best.peak <= limit:
            break
        missed = np.maximum(missed, model_miss(pmap.problem, pmap.labels, solution.decision,
                                               realised.timeline))
    return best


def with_missed(pmap: ProblemMap, missed: np.ndarray):
    """The problem with what its linear model missed added to its base."""
    return dataclasses.replace(pmap.problem, base=pmap.problem.base + missed)


def model_miss(problem, labels: tuple[str, ...], decision, timeline: MemoryTimeline) -> np.ndarray:
    """Per position of ``problem``, how many bytes the simulation of the realised graphs holds
    beyond the linear model's prediction for ``decision`` (0 where it holds less).

    A simulation point maps to the joint graph's position of the first op at or after it that
    the joint graph has in the same phase: recomputed ops run right before the backward op that
    first needs them, which is where the model charges them."""
    model = problem.memory(decision)
    n_fwd = problem.backward_start
    position = {label: t for t, label in enumerate(labels)}
    miss = np.zeros(problem.num_positions, dtype=np.int64)
    total = timeline.total
    mapped = problem.num_positions - 1
    for k in range(len(timeline.labels) - 1, -1, -1):  # latest first: "the next op" is known
        t = position.get(timeline.labels[k])
        in_backward = k >= timeline.backward_start
        if t is not None and (t >= n_fwd) == in_backward:
            mapped = t
        elif not in_backward and mapped >= n_fwd:
            mapped = n_fwd - 1  # a forward point after the last forward op the joint has
        miss[mapped] = max(miss[mapped], int(total[k]) - int(model[mapped]))
    return miss


def descend(pmap: ProblemMap, lever, realise: Callable[[Any], Realised], start: Realised, *,
            budget: int, step: float = 0.03, tries: int = 3) -> Realised:
    """A lower floor than ``start``'s, if fitting finds one: the smallest-peak decision's linear
    model can be far from its simulation (WideResNet: 142 MiB predicted, 182 simulated), while
    the ordinary fit, fed what the model misses, reaches plans that simulate lower (176 MiB).
    Fits at ``step`` under the best peak so far, ``tries`` times or until one finds nothing."""
    best = start
    for _ in range(tries):
        target = int(best.peak * (1.0 - step))
        found, _ = fit(pmap, lever, realise, target, budget=budget, max_rounds=2)
        if found is None or found.peak >= best.peak:
            break
        best = found
    return best
