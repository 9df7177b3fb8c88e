"""Solving the recompute ILP: least recomputation time with the memory under the budget everywhere
(:func:`solve_ilp`), or the smallest peak (:func:`min_peak`).

The model (its variables and rows) is :mod:`fxmem.solver.ilp_model`. Its memory rows are many (one
per position) and dense, so they are generated lazily: solve with the rows at the worst positions
of the warm start, evaluate the answer at every position, add the violated rows, solve again.
The model is kept as plain arrays: HiGHS (``highspy``, in this process) reads them directly --
built through PuLP's objects they took most of a solve's time on GPT-2 small's problems (8,000
candidates) -- with the columns and rows PuLP gave it; where ``highspy`` is not installed, CBC
(shipped with PuLP: a PuLP problem is made from the arrays; a process per solve, warm-started by
a greedy answer). The time limit returns the best feasible answer found, with the solver's
optimality gap.

HiGHS is the default because it plans better and faster: on the bench GPT decoder and WRN-28-2
(batch 32, AdamW, Inductor lowering, 10 s per solve) it found the same floor as CBC for the GPT and
a 9% lower one for the WRN (67.0 against 73.9 MB, CBC stopped at its time limit), in 35-45% less
solver time (40 against 57 s and 27 against 53 s over each step's floor and plan).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
import warnings

import numpy as np
# PuLP (a required dependency, used only by the CBC fallback) is imported with this module, and
# so with fxmem, not lazily: PuLP keeps the ImportErrors of the solvers it cannot load (``err =
# e``), whose tracebacks pin every frame that was live when PuLP was first imported. Imported
# lazily inside a torch.compile partitioner, that pinned the user's forward frame and its outputs
# (a whole logits tensor) for the life of the process.
import pulp

from fxmem.solver.baselines import greedy, save_all
from fxmem.solver.ilp_model import _Model, _rows_csr
from fxmem.solver.memo import memoised
from fxmem.solver.problem import Decision, RecomputeProblem
from fxmem.solver.result import RecomputeSolution, solution_for

__all__ = ["solve_ilp", "min_peak"]

log = logging.getLogger(__name__)


def _solve(model: _Model, time_limit: float, gap: float
           ) -> tuple[str, Decision | None, float | None]:
    """``(status, decision, gap)`` of ``model``'s solve: status "optimal" (within ``gap``),
    "feasible" (the time limit's best) or the solver's word for no answer (decision None)."""
    if _has_highs():
        return _solve_highs(model, time_limit, gap)
    return _solve_cbc(model, time_limit, gap)


def _columns(model: _Model) -> list[int]:
    """The columns in PuLP's order (sorted by name)."""
    return sorted(range(len(model.col_name)), key=model.col_name.__getitem__)


def _solve_highs(model: _Model, time_limit: float, gap: float):
    import highspy

    order = _columns(model)
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", float(gap))
    h.setOptionValue("threads", 1)
    h.setOptionValue("time_limit", float(max(0.5, float(time_limit))))
    ncols = len(order)
    cost = np.array([model.col_cost.get(j, 0.0) for j in order], dtype=np.float64)
    low = np.array([model.col_low[j] for j in order], dtype=np.float64)
    high = np.array([model.col_high[j] for j in order], dtype=np.float64)
    h.addCols(ncols, cost, low, high, 0, np.zeros(0, dtype=np.int32),
              np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float64))
    integer = np.array([k for k, j in enumerate(order) if model.col_integer[j]],
                       dtype=np.int32)
    if len(integer):
        h.changeColsIntegrality(len(integer), integer, np.full(
            len(integer), highspy.HighsVarType.kInteger.value, dtype=np.uint8))
    kept = model.shape.csr()
    more = _rows_csr(model.rows_data[len(model.shape.rows_data):])
    starts = np.concatenate([kept[0], more[0] + len(kept[1])]).astype(np.int32)
    index = position[np.concatenate([kept[1], more[1]])].astype(np.int32)
    value, row_low, row_high = (np.concatenate([k, m]) for k, m in zip(kept[2:], more[2:]))
    h.addRows(len(starts), row_low, row_high, len(index), starts, index, value)
    h.run()
    status, info = h.getModelStatus(), h.getInfo()
    if info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible:
        model.values = np.asarray(h.getSolution().col_value, dtype=np.float64)[position]
    if status == highspy.HighsModelStatus.kOptimal:
        return "optimal", model.decision(), max(0.0, float(info.mip_gap))
    if info.primal_solution_status != highspy.SolutionStatus.kSolutionStatusFeasible:
        return h.modelStatusToString(status).lower(), None, None
    return "feasible", model.decision(), float(info.mip_gap)


def _pulp_problem(model: _Model):
    """The model as a PuLP problem (for CBC), built as it was before the arrays."""
    lp = pulp.LpProblem("fxmem_recompute", pulp.LpMinimize)
    cols = []
    for j, name in enumerate(model.col_name):
        cat = "Binary" if model.col_integer[j] else "Continuous"
        high = None if model.col_high[j] == np.inf else model.col_high[j]
        v = (lp.add_variable(name, model.col_low[j], high, cat)
             if hasattr(lp, "add_variable") else pulp.LpVariable(name, model.col_low[j], high,
                                                                 cat=cat))
        if j in model.initial:
            v.setInitialValue(model.initial[j])
        cols.append(v)
    lp += pulp.LpAffineExpression([(cols[j], c) for j, c in model.col_cost.items()])
    for coef, lo, hi, name in model.rows_data:
        expr = pulp.LpAffineExpression([(cols[j], c) for j, c in coef.items()])
        if hi == np.inf:
            lp += pulp.LpConstraint(expr, pulp.LpConstraintGE, name=name, rhs=lo)
        else:
            lp += pulp.LpConstraint(expr, pulp.LpConstraintLE, name=name, rhs=hi)
    return lp, cols


def _solve_cbc(model: _Model, time_limit: float, gap: float):
    lp, cols = _pulp_problem(model)
    fd, log_path = tempfile.mkstemp(suffix=".log", prefix="fxmem_cbc_")
    os.close(fd)
    with warnings.catch_warnings():  # the bundled CBC: PuLP 4 moves it to pulp[cbc]
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(time_limit)),
                                   gapRel=gap, warmStart=True, logPath=log_path, threads=1)
    try:
        status = lp.solve(solver)
        text = open(log_path).read()
    finally:
        os.unlink(log_path)
    name = pulp.LpStatus[status]
    if name != "Optimal":  # PuLP says "Optimal" also for a feasible answer at the time limit
        return name.lower(), None, None
    model.values = np.array([v.value() or 0.0 for v in cols], dtype=np.float64)
    # the next solve starts from this answer, as the PuLP problem kept its values
    model.initial = {j: v.value() for j, v in enumerate(cols) if v.value() is not None}
    return _cbc_status(text), model.decision(), _cbc_gap(text)


def _has_highs() -> bool:
    """Whether HiGHS (``pip install highspy``) is there to solve; else CBC does (said once)."""
    global _HIGHS
    if _HIGHS is None:
        try:
            import highspy  # noqa: F401
        except ImportError:
            _HIGHS = False
            log.info("fxmem: highspy is not installed, so the recompute ILP is solved by CBC "
                     "(slower, weaker plans at a time limit): pip install highspy")
        else:
            _HIGHS = True
            _first_highs_unheard(highspy)
    return _HIGHS


def _first_highs_unheard(highspy) -> None:
    """HiGHS prints a banner to stdout (the C stream) at the process's first ``Highs()``, even
    with its output off: that first one is made here, with stdout sent to /dev/null."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no file descriptor 1 (an embedding host): banner and all
        highspy.Highs()
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_HIGHS: bool | None = None


def _cbc_gap(text: str) -> float | None:
    """The relative gap CBC reports ("Gap:"), else 0 for a proven optimum, else None."""
    gap = re.findall(r"^Gap:\s*([-+0-9.eE]+)", text, flags=re.M)
    if gap:
        return float(gap[-1])
    return 0.0 if "Optimal solution found" in text else None


def _cbc_status(text: str) -> str:
    return "optimal" if "Optimal solution found" in text else "feasible"


@memoised
def solve_ilp(
    problem: RecomputeProblem,
    budget: int,
    *,
    time_limit: float = 30.0,
    gap: float = 0.01,
    initial_rows: int = 24,
    max_rounds: int = 30,
) -> RecomputeSolution:
    """The cheapest recomputation whose linear-model peak is at most ``budget`` bytes."""
    t0 = time.perf_counter()
    warm = greedy(problem, budget)
    if save_all(problem).peak <= budget:  # nothing to recompute
        sol = save_all(problem, budget)
        return solution_for(problem, sol.decision, strategy="ilp", budget=budget,
                            solve_seconds=time.perf_counter() - t0, status="optimal", gap=0.0)
    if _base_over(problem, budget):  # what the solver would find, without building the model
        return solution_for(problem, warm.decision, strategy="ilp", budget=budget,
                            solve_seconds=time.perf_counter() - t0, status="infeasible", gap=None)
    model = _Model(problem, "time")
    # half a byte of slack: live bytes are integers, so it admits no decision over the budget, and
    # CBC's preprocessing declared a problem whose optimum meets a row exactly infeasible
    # (hypothesis found it: a 3-value chain at its floor)
    budget_scaled = (budget + 0.5) / model.scale
    start = save_all(problem).decision
    for t in _worst_positions(problem, [start, warm.decision], budget, initial_rows):
        model.add_row(t, budget_scaled)
    if warm.feasible:
        model.warm_start(warm.decision)
    best: tuple[str, Decision, float | None] | None = None
    for round_ in range(max_rounds):
        remaining = time_limit - (time.perf_counter() - t0)
        if remaining <= 0.5:
            break
        status, decision, g = _solve(model, remaining, gap)
        if decision is None:
            log.debug("ILP round %d: %s", round_, status)
            break
        memory = problem.memory(decision)
        violated = np.flatnonzero(memory > budget)
        log.debug("ILP round %d: %s, %d rows, %d positions over budget", round_, status,
                  len(model.rows), len(violated))
        if not len(violated):
            best = (status, decision, g)
            break
        for t in violated[np.argsort(-memory[violated])][:initial_rows]:
            model.add_row(int(t), budget_scaled)
        model.warm_start(warm.decision if warm.feasible else decision)
    seconds = time.perf_counter() - t0
    if best is None:
        if warm.feasible:
            return solution_for(problem, warm.decision, strategy="ilp", budget=budget,
                                solve_seconds=seconds, status="feasible", gap=None)
        return solution_for(problem, warm.decision, strategy="ilp", budget=budget,
                            solve_seconds=seconds, status="infeasible", gap=None)
    status, decision, g = best
    if warm.feasible and problem.recompute_time(warm.decision) < problem.recompute_time(decision):
        decision = warm.decision  # CBC stopped early with a worse answer than its warm start
    return solution_for(problem, decision, strategy="ilp", budget=budget, solve_seconds=seconds,
                        status=status, gap=g)


@memoised
def min_peak(problem: RecomputeProblem, *, time_limit: float = 30.0, gap: float = 0.0
             ) -> RecomputeSolution:
    """The decision with the smallest linear-model peak (the floor of feasible budgets), within
    ``gap`` of it."""
    t0 = time.perf_counter()
    everything = problem.normalise(problem.must_save)  # recompute all that may be recomputed
    model = _Model(problem, "peak")
    for t in _worst_positions(problem, [everything], None, 24):
        model.add_row(t, None)
    best = everything
    for _ in range(30):
        remaining = time_limit - (time.perf_counter() - t0)
        if remaining <= 0.5:
            break
        model.warm_start(best)
        status, decision, _ = _solve(model, remaining, gap)
        if decision is None:
            break
        if problem.peak(decision) < problem.peak(best):
            best = decision
        memory = problem.memory(decision)
        claimed = model.value(model.peak_var) * model.scale
        violated = np.flatnonzero(memory > claimed + 1)
        if not len(violated):
            break
        for t in violated[np.argsort(-memory[violated])][:24]:
            model.add_row(int(t), None)
    return solution_for(problem, best, strategy="min-peak", budget=None,
                        solve_seconds=time.perf_counter() - t0, status="feasible")


def _base_over(problem: RecomputeProblem, budget: int) -> bool:
    """Whether no decision can fit ``budget``: some position's base (what it holds whatever is
    saved or recomputed: every other term is bytes, never negative) is over it -- a floor search
    asks for 1 byte (on GPT-2 small that solve took 1.5 s to say so)."""
    return bool(problem.base.max() > budget) and all(
        bool((a >= 0).all()) for a in (problem.size, problem.again_size, problem.transient))


def _worst_positions(problem, decisions, budget, k) -> list[int]:
    positions: set[int] = set()
    for decision in decisions:
        memory = problem.memory(decision)
        order = np.argsort(-memory)
        positions.update(int(t) for t in order[:k])
    return sorted(positions)
