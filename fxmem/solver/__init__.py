"""Optimisation over plain data (node ids, sizes, costs). Solvers never import torch.fx.

Every strategy returns a :class:`RecomputeSolution`, so they can be swapped and compared.
"""

from fxmem.solver.baselines import checkpoint_blocks, greedy, save_all
from fxmem.solver.ilp import min_peak, solve_ilp
from fxmem.solver.problem import Decision, RecomputeProblem
from fxmem.solver.result import RecomputeSolution

__all__ = [
    "Decision",
    "RecomputeProblem",
    "RecomputeSolution",
    "checkpoint_blocks",
    "greedy",
    "min_peak",
    "save_all",
    "solve_ilp",
]
