"""The recompute ILP: least recomputation time with the memory under the budget everywhere.

Variables per candidate ``i``: ``save[i]`` (binary), ``need[i]`` and ``again[i]`` (continuous in
[0, 1], integral whenever ``save`` is)::

    minimise   sum_i cost[i] * again[i] + sum_i save_cost[i] * save[i]
    subject to need[i] = 1                        if the backward reads i
               need[k] >= need[i] - save[i]       for every input k of i (recomputing needs inputs)
               pulled[i, s] >= need[m] - save[m] - save[i] - sum(save[interior])   (pulls)
               again[i] >= need[i] - save[i]
               save[i] <= need[i]
               base[t] + sum_i size[i] * (save[i] * keep[i,t] + again[i] * again_window[i,t])
                       + sum_{i first needed at t} transient[i] * again[i] <= B

The memory rows are many (one per position) and dense, so they are generated lazily: solve with
the rows at the worst positions of the warm start, evaluate the answer at every position, add the
violated rows, solve again. The model is kept as plain arrays (:class:`_Model`): HiGHS
(``highspy``, in this process) reads them directly -- built through PuLP's objects they took most
of a solve's time on GPT-2 small's problems (8,000 candidates) -- with the columns and rows PuLP
gave it; where ``highspy`` is not installed, CBC (shipped with PuLP: a PuLP problem is made from
the arrays; a process per solve, warm-started by a greedy
answer). The time limit returns the best feasible answer found, with the solver's optimality gap.

HiGHS is the default because it plans better and faster: on the bench GPT decoder and WRN-28-2
(batch 32, AdamW, Inductor lowering, 10 s per solve) it found the same floor as CBC for the GPT and
a 9% lower one for the WRN (67.0 against 73.9 MB, CBC stopped at its time limit), in 35-45% less
solver time (40 against 57 s and 27 against 53 s over each step's floor and plan).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import tempfile
import time
import warnings

import numpy as np
import pulp  # a required dependency, imported with fxmem -- see _pulp()

from fxmem.solver.baselines import greedy, save_all
from fxmem.solver.memo import memoised
from fxmem.solver.problem import Decision, RecomputeProblem
from fxmem.solver.result import RecomputeSolution, solution_for

__all__ = ["solve_ilp", "min_peak"]

log = logging.getLogger(__name__)


def _pulp():
    # PuLP keeps the ImportErrors of the solvers it cannot load (``err = e``); their tracebacks
    # pin every frame that was live when PuLP was first imported. Imported lazily inside a
    # torch.compile partitioner, that pinned the user's forward frame and its outputs (a whole
    # logits tensor) for the life of the process. So PuLP is imported with this module.
    return pulp


class _Var:
    """A column of the model (its index in the order of creation)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Row:
    """A linear expression built term by term as PuLP builds it: coefficients per column in the
    order first met (a repeated column's coefficients added), constants added up."""

    __slots__ = ("coef", "constant")

    def __init__(self):
        self.coef: dict[int, float] = {}
        self.constant = 0.0

    def add(self, value, times=1.0) -> _Row:
        """``value`` (a column, or a number: a fixed decision) times ``times`` added (nothing
        for ``times`` 0: PuLP keeps no term for a column times 0)."""
        if times == 0:
            return self
        if isinstance(value, _Var):
            j = value.index
            self.coef[j] = self.coef[j] + times if j in self.coef else times
        else:
            self.constant += value * times
        return self


def _rows_csr(rows) -> tuple[np.ndarray, ...]:
    """Rows ``(coefficients, lower, upper, name)`` as arrays: starts, columns (in the order of
    creation), values, lower and upper bounds; zero coefficients left out."""
    starts, index, value, low, high = [], [], [], [], []
    for coef, lo, hi, _ in rows:
        starts.append(len(index))
        for j, c in coef.items():
            if c != 0:
                index.append(j)
                value.append(c)
        low.append(lo)
        high.append(hi)
    return (np.array(starts, dtype=np.int64), np.array(index, dtype=np.int64),
            np.array(value, dtype=np.float64), np.array(low, dtype=np.float64),
            np.array(high, dtype=np.float64))


class _Structure:
    """What a model's columns and rows are before its objective and memory rows: the same for
    every problem of one step (the planner's rounds change only the base, the budget and the
    objective), so built once per step (:func:`_structure`)."""

    def __init__(self, problem: RecomputeProblem):
        self.col_name: list[str] = []
        self.col_low: list[float] = []
        self.col_high: list[float] = []
        self.col_integer: list[bool] = []
        self.rows_data: list[tuple[dict[int, float], float, float, str | None]] = []
        n = problem.num_candidates
        self.save, self.need, self.again = [], [], []
        var = self._variable
        for i in range(n):
            if problem.must_save[i]:
                s = 1
            elif problem.never_save[i]:
                s = 0
            else:
                s = var(f"s{i}", 0, 1, True)
            self.save.append(s)
            self.need.append(1 if problem.direct[i] else var(f"n{i}", 0, 1))
            self.again.append(var(f"a{i}", 0, 1))
        save, need, again = self.save, self.need, self.again
        for i in range(n):
            # again[i] >= need[i] - save[i]
            self._ge(_Row().add(again[i]).add(need[i], -1.0).add(save[i]), 0.0)
            if not isinstance(save[i], int):  # save[i] <= need[i]
                self._le(_Row().add(save[i]).add(need[i], -1.0), 0.0)
            for k in problem.inputs[i]:
                if not problem.direct[k]:  # need[k] >= need[i] - save[i]
                    self._ge(_Row().add(need[k]).add(need[i], -1.0).add(save[i]), 0.0)
        self.pulled: dict[int, list[tuple[int, _Var]]] = {}  # target -> [(start, var)], sorted
        by_target: dict[int, list] = {}
        for p in problem.pulls:
            # open = need[by] - save[by] - save[target] - sum(save[interior])
            open_ = _Row().add(need[p.by]).add(save[p.by], -1.0).add(save[p.target], -1.0)
            inner = _Row()
            for j in p.interior:
                inner.add(save[j])
            for j, c in inner.coef.items():
                open_.add(_Var(j), -c)
            open_.constant -= inner.constant
            if p.far:
                self._le(open_, 0.0)
            elif p.start < problem.need_start[p.target]:
                by_target.setdefault(p.target, []).append((p.start, open_))
        for i, terms in by_target.items():
            starts = sorted({s for s, _ in terms})
            w = {s: var(f"w{i}_{s}", 0, 1) for s in starts}
            for a, b in zip(starts, starts[1:]):
                self._ge(_Row().add(w[b]).add(w[a], -1.0), 0.0)  # alive earlier: alive later
            for s, term in terms:  # w[s] >= term
                row = _Row().add(w[s])
                for j, c in term.coef.items():
                    row.add(_Var(j), -c)
                row.constant -= term.constant
                self._ge(row, 0.0)
            self.pulled[i] = [(s, w[s]) for s in starts]

    def csr(self) -> tuple[np.ndarray, ...]:
        """The rows as arrays (starts, columns, values, lower, upper; zero coefficients left
        out, as PuLP leaves them out), made once."""
        if self._csr is None:
            self._csr = _rows_csr(self.rows_data)
        return self._csr

    _csr = None

    def _variable(self, name, low, high, integer=False) -> _Var:
        self.col_name.append(name)
        self.col_low.append(float(low))
        self.col_high.append(np.inf if high is None else float(high))
        self.col_integer.append(integer)
        return _Var(len(self.col_name) - 1)

    def _ge(self, row: _Row, rhs: float, name: str | None = None) -> None:
        self.rows_data.append((row.coef, -(row.constant - rhs), np.inf, name))

    def _le(self, row: _Row, rhs: float, name: str | None = None) -> None:
        self.rows_data.append((row.coef, -np.inf, -(row.constant - rhs), name))


_STRUCTURES: collections.OrderedDict[tuple, tuple[tuple, _Structure]] = collections.OrderedDict()
_STRUCTURES_KEPT = 8


def _structure(problem: RecomputeProblem) -> _Structure:
    """The :class:`_Structure` of ``problem``, kept for the few latest: keyed by the identity of
    its inputs and pulls (immutable; a problem the planner derives with another base or costs
    shares them; kept with it, so an identity is not reused while kept) and the contents of the
    arrays it reads."""
    arrays = tuple(np.array(a) for a in (problem.must_save, problem.never_save, problem.direct,
                                         problem.need_start))
    fields = (problem.inputs, problem.pulls)  # tuples of ints and frozen pulls
    key = (*map(id, fields), *(hash(a.tobytes()) for a in arrays))
    kept = _STRUCTURES.get(key)
    if kept is not None and all(np.array_equal(a, b) for a, b in zip(arrays, kept[0][2:])):
        _STRUCTURES.move_to_end(key)
        return kept[1]
    shape = _Structure(problem)
    _STRUCTURES[key] = ((*fields, *arrays), shape)
    while len(_STRUCTURES) > _STRUCTURES_KEPT:
        _STRUCTURES.popitem(last=False)
    return shape


class _Model:
    """The ILP with its lazily grown set of memory rows, as plain arrays: HiGHS reads them in
    process (``highspy``: no PuLP objects, which took most of a solve's time on GPT-2 small's
    8,000-candidate problems); CBC through a PuLP problem made from them. Columns and rows are
    those PuLP made when the model was built with it (the same names, bounds, coefficients and
    order; HiGHS sees the columns sorted by name, as PuLP passed them), so the answers are the
    same."""

    def __init__(self, problem: RecomputeProblem, objective: str):
        self.p = problem
        # memory rows in units that put the largest live total near 1e4: CBC's tolerances are
        # absolute, so neither bytes of a GiB-scale step nor MiB of a tiny one would do
        self.scale = max(1.0, float(problem.base.max()) / 1e4)
        shape = self.shape = _structure(problem)
        self.col_name = list(shape.col_name)
        self.col_low = list(shape.col_low)
        self.col_high = list(shape.col_high)
        self.col_integer = list(shape.col_integer)
        self.col_cost: dict[int, float] = {}
        # rows: (coefficients {column: value}, lower, upper, name)
        self.rows_data = list(shape.rows_data)
        self.initial: dict[int, float] = {}
        self.values: np.ndarray | None = None  # the last answer, per column
        self.save, self.need, self.again = shape.save, shape.need, shape.again
        self.pulled = shape.pulled
        save, again, n = self.save, self.again, problem.num_candidates
        var = self._variable
        self.peak_var = None
        if objective == "time":  # in microseconds: CBC's absolute tolerances dwarf tiny objectives
            for i in range(n):
                if problem.cost[i] != 0:  # as PuLP: no term for a column times 0
                    self.col_cost[again[i].index] = 1e6 * float(problem.cost[i])
            for i in range(n):
                if problem.save_cost[i] > 0 and not isinstance(save[i], int):
                    self.col_cost[save[i].index] = 1e6 * float(problem.save_cost[i])
        else:  # minimise the peak
            self.peak_var = var("peak", 0, None)
            self.col_cost[self.peak_var.index] = 1.0
        self.rows: set[int] = set()

    _variable, _ge, _le = _Structure._variable, _Structure._ge, _Structure._le

    def add_row(self, t: int, budget_scaled: float | None) -> None:
        if t in self.rows:
            return
        self.rows.add(t)
        p, scale = self.p, self.scale
        keep = (p.fwd_end < t) & (t <= p.need_end)
        again = (p.need_start <= t) & (t <= p.need_end)
        made = (p.need_start == t) & (p.transient > 0)
        row = _Row()
        for i in np.flatnonzero(keep):
            row.add(self.save[i], float(p.size[i]) / scale)
        for i in np.flatnonzero(again):
            row.add(self.again[i], float(p.again_size[i]) / scale)
        for i in np.flatnonzero(made):
            row.add(self.again[i], float(p.transient[i]) / scale)
        for i, starts in self.pulled.items():
            if t < p.need_start[i]:
                live = [w for s, w in starts if s <= t]
                if live:
                    row.add(live[-1], float(p.again_size[i]) / scale)
        row.constant += float(p.base[t]) / scale
        if budget_scaled is None:
            row.add(self.peak_var, -1.0)
            self._le(row, 0.0, f"mem_{t}")
        else:
            self._le(row, budget_scaled, f"mem_{t}")

    def warm_start(self, decision: Decision) -> None:
        for i, s in enumerate(self.save):
            if not isinstance(s, int):
                self.initial[s.index] = int(decision.saved[i])

    def solve(self, time_limit: float, gap: float) -> tuple[str, Decision | None, float | None]:
        """``(status, decision, gap)``: status "optimal" (within ``gap``), "feasible" (the
        time limit's best) or the solver's word for no answer (decision None)."""
        if _has_highs():
            return self._solve_highs(time_limit, gap)
        return self._solve_cbc(time_limit, gap)

    def value(self, var) -> float:
        if isinstance(var, int):
            return float(var)
        return float(self.values[var.index])

    def _decision(self) -> Decision:
        saved = np.array([s if isinstance(s, int) else self.value(s) > 0.5 for s in self.save])
        return self.p.normalise(saved)

    def _columns(self) -> list[int]:
        """The columns in PuLP's order (sorted by name)."""
        return sorted(range(len(self.col_name)), key=self.col_name.__getitem__)

    def _solve_highs(self, time_limit: float, gap: float):
        import highspy

        order = self._columns()
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("mip_rel_gap", float(gap))
        h.setOptionValue("threads", 1)
        h.setOptionValue("time_limit", float(max(0.5, float(time_limit))))
        ncols = len(order)
        cost = np.array([self.col_cost.get(j, 0.0) for j in order], dtype=np.float64)
        low = np.array([self.col_low[j] for j in order], dtype=np.float64)
        high = np.array([self.col_high[j] for j in order], dtype=np.float64)
        h.addCols(ncols, cost, low, high, 0, np.zeros(0, dtype=np.int32),
                  np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float64))
        integer = np.array([k for k, j in enumerate(order) if self.col_integer[j]],
                           dtype=np.int32)
        if len(integer):
            h.changeColsIntegrality(len(integer), integer, np.full(
                len(integer), highspy.HighsVarType.kInteger.value, dtype=np.uint8))
        kept = self.shape.csr()
        more = _rows_csr(self.rows_data[len(self.shape.rows_data):])
        starts = np.concatenate([kept[0], more[0] + len(kept[1])]).astype(np.int32)
        index = position[np.concatenate([kept[1], more[1]])].astype(np.int32)
        value, row_low, row_high = (np.concatenate([k, m]) for k, m in zip(kept[2:], more[2:]))
        h.addRows(len(starts), row_low, row_high, len(index), starts, index, value)
        h.run()
        status, info = h.getModelStatus(), h.getInfo()
        if info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible:
            self.values = np.asarray(h.getSolution().col_value, dtype=np.float64)[position]
        if status == highspy.HighsModelStatus.kOptimal:
            return "optimal", self._decision(), max(0.0, float(info.mip_gap))
        if info.primal_solution_status != highspy.SolutionStatus.kSolutionStatusFeasible:
            return h.modelStatusToString(status).lower(), None, None
        return "feasible", self._decision(), float(info.mip_gap)

    def _pulp_problem(self):
        """The model as a PuLP problem (for CBC), built as it was before the arrays."""
        lp = pulp.LpProblem("fxmem_recompute", pulp.LpMinimize)
        cols = []
        for j, name in enumerate(self.col_name):
            cat = "Binary" if self.col_integer[j] else "Continuous"
            high = None if self.col_high[j] == np.inf else self.col_high[j]
            v = (lp.add_variable(name, self.col_low[j], high, cat)
                 if hasattr(lp, "add_variable") else pulp.LpVariable(name, self.col_low[j], high,
                                                                     cat=cat))
            if j in self.initial:
                v.setInitialValue(self.initial[j])
            cols.append(v)
        lp += pulp.LpAffineExpression([(cols[j], c) for j, c in self.col_cost.items()])
        for coef, lo, hi, name in self.rows_data:
            expr = pulp.LpAffineExpression([(cols[j], c) for j, c in coef.items()])
            if hi == np.inf:
                lp += pulp.LpConstraint(expr, pulp.LpConstraintGE, name=name, rhs=lo)
            else:
                lp += pulp.LpConstraint(expr, pulp.LpConstraintLE, name=name, rhs=hi)
        return lp, cols

    def _solve_cbc(self, time_limit: float, gap: float):
        lp, cols = self._pulp_problem()
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
        self.values = np.array([v.value() or 0.0 for v in cols], dtype=np.float64)
        # the next solve starts from this answer, as the PuLP problem kept its values
        self.initial = {j: v.value() for j, v in enumerate(cols) if v.value() is not None}
        return _cbc_status(text), self._decision(), _cbc_gap(text)


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
        status, decision, g = model.solve(remaining, gap)
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
        status, decision, _ = model.solve(remaining, gap)
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
