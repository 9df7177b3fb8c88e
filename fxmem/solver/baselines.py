"""Baseline strategies: save everything, checkpoint every block, and a greedy under a budget."""

from __future__ import annotations

import time

import numpy as np

from fxmem.solver.problem import RecomputeProblem
from fxmem.solver.result import RecomputeSolution, solution_for

__all__ = ["save_all", "checkpoint_blocks", "greedy"]


def save_all(problem: RecomputeProblem, budget: int | None = None) -> RecomputeSolution:
    """What eager autograd does: keep every value the backward reads."""
    t0 = time.perf_counter()
    decision = problem.normalise(problem.exact_saves)
    return solution_for(problem, decision, strategy="save-all", budget=budget,
                        solve_seconds=time.perf_counter() - t0, status="heuristic")


def checkpoint_blocks(problem: RecomputeProblem, budget: int | None = None) -> RecomputeSolution:
    """``torch.utils.checkpoint`` around every block: inside a block nothing is saved except what
    may not be recomputed; values outside blocks and values leaving a block are saved."""
    t0 = time.perf_counter()
    block = problem.block
    leaves_block = np.zeros(problem.num_candidates, dtype=bool)
    for j, ins in enumerate(problem.inputs):
        for k in ins:
            if block[k] != block[j]:
                leaves_block[k] = True
    saved = (block < 0) | leaves_block
    decision = problem.normalise(saved & problem.exact_saves)
    return solution_for(problem, decision, strategy="checkpoint-blocks", budget=budget,
                        solve_seconds=time.perf_counter() - t0, status="heuristic")


def greedy(problem: RecomputeProblem, budget: int, max_steps: int | None = None) -> RecomputeSolution:
    """Start from save-all; while the peak is over budget, stop saving the value alive at the peak
    that frees the most bytes per second of recomputation -- among those whose recomputation
    lowers the memory there without raising the peak elsewhere (recomputing a value needs its
    inputs, and may bring them back early)."""
    t0 = time.perf_counter()
    decision = problem.normalise(problem.exact_saves)
    memory = problem.memory(decision)
    tried = np.zeros(problem.num_candidates, dtype=bool)  # given up in vain since the last step
    lo, hi = problem.fwd_end + 1, problem.need_end  # where a saved value is kept past its use
    steps = 0
    limit = max_steps or 4 * problem.num_candidates
    while steps < limit:
        t = int(np.argmax(memory))
        if memory[t] <= budget:
            break
        alive = decision.saved & (lo <= t) & (t <= hi) & ~problem.must_save & ~tried
        # recomputing i frees its keep window at t unless t falls in its recompute window
        frees = problem.size - problem.again_size * (
            (problem.need_start <= t) & (t <= problem.need_end))
        score = np.where(alive & (frees > 0), frees / (problem.cost + 1e-9), -np.inf)
        best = int(np.argmax(score))
        if not np.isfinite(score[best]):
            break
        trial = decision.saved.copy()
        trial[best] = False
        trial_decision = problem.normalise(trial)
        trial_memory = problem.memory(trial_decision)
        if trial_memory[t] < memory[t] and trial_memory.max() <= memory[t]:
            decision, memory = trial_decision, trial_memory
            tried[:] = False
            steps += 1
        else:
            tried[best] = True
    return solution_for(problem, decision, strategy="greedy", budget=budget,
                        solve_seconds=time.perf_counter() - t0, status="heuristic")
