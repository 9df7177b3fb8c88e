"""The planner's feedback from the simulation of the realised graphs to the linear model."""

import numpy as np

from fxmem.memory.simulation import CATEGORIES, MemoryTimeline
from fxmem.levers.recompute.fit import model_miss
from fxmem.solver import RecomputeProblem


def _empty_problem(base, backward_start):
    none = np.zeros(0, dtype=np.int64)
    return RecomputeProblem(
        names=(), size=none, cost=np.zeros(0), fwd_end=none, need_start=none, need_end=none,
        direct=np.zeros(0, dtype=bool), inputs=(), must_save=np.zeros(0, dtype=bool),
        never_save=np.zeros(0, dtype=bool), base=np.array(base, dtype=np.int64),
        backward_start=backward_start, block=none)


def _timeline(labels, totals, backward_start):
    live = np.zeros((len(labels), len(CATEGORIES)), dtype=np.int64)
    live[:, 0] = totals
    return MemoryTimeline(labels=tuple(labels), live=live, backward_start=backward_start,
                          allocated=np.cumsum(totals))


def test_model_miss_charges_recomputed_points_to_the_op_that_needs_them():
    problem = _empty_problem([10, 20, 30, 40, 45], backward_start=2)
    labels = ("f0", "f1", "b0", "b1", "optimizer.step")
    # the backward recomputes f1 (same name, in the backward) and an op the joint has not, then
    # runs b0: both points are charged to b0's position; b1 holds less than the model says
    sim = _timeline(["f0", "f1", "f1", "rx", "b0", "b1", "optimizer.step"],
                    [10, 25, 60, 50, 30, 35, 47], backward_start=2)
    miss = model_miss(problem, labels, problem.normalise(np.zeros(0, dtype=bool)), sim)
    np.testing.assert_array_equal(miss, [0, 5, 30, 0, 2])
