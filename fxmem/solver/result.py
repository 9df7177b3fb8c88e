"""The one result type every recompute strategy returns, so strategies can be swapped and compared."""

from __future__ import annotations

import dataclasses

from fxmem.solver.problem import Decision, RecomputeProblem

__all__ = ["RecomputeSolution", "solution_for"]


@dataclasses.dataclass(frozen=True)
class RecomputeSolution:
    strategy: str
    decision: Decision
    peak: int  # bytes, by the problem's linear memory model
    recompute_time: float  # seconds of recomputation in the backward
    budget: int | None
    solve_seconds: float
    status: str  # "optimal", "feasible" (time limit or gap reached), "infeasible", "heuristic"
    gap: float | None = None  # relative optimality gap, when the strategy bounds it

    @property
    def feasible(self) -> bool:
        return self.budget is None or self.peak <= self.budget

    @property
    def num_recomputed(self) -> int:
        return int(self.decision.recomputed.sum())

    @property
    def num_saved(self) -> int:
        return int(self.decision.saved.sum())


def solution_for(problem: RecomputeProblem, decision: Decision, *, strategy: str, budget: int | None,
                 solve_seconds: float, status: str, gap: float | None = None) -> RecomputeSolution:
    return RecomputeSolution(
        strategy=strategy,
        decision=decision,
        peak=problem.peak(decision),
        recompute_time=problem.recompute_time(decision),
        budget=budget,
        solve_seconds=solve_seconds,
        status=status,
        gap=gap,
    )
