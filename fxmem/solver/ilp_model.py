"""The recompute ILP's model: its columns and rows as plain arrays, memory rows added lazily.

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

(or, for the smallest peak, ``peak`` minimised with ``peak`` in place of ``B``). The rows other
than the memory rows are the same for every problem of one step, so they are built once
(:class:`_Structure`, kept for the latest few); :class:`_Model` adds the objective and the memory
rows a solve asks for (:meth:`_Model.add_row`), a warm start, and reads an answer's decision. The
columns and rows are those PuLP made when the model was built with it (the same names, bounds,
coefficients and order). Solved by :mod:`fxmem.solver.ilp`.
"""

from __future__ import annotations

import collections

import numpy as np

from fxmem.solver.problem import Decision, RecomputeProblem

__all__: list[str] = []  # private to fxmem.solver.ilp, which solves the model


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
    8,000-candidate problems); CBC through a PuLP problem made from them (both in
    :mod:`fxmem.solver.ilp`, which sets :attr:`values`, the last answer). Columns and rows are
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

    def value(self, var) -> float:
        if isinstance(var, int):
            return float(var)
        return float(self.values[var.index])

    def decision(self) -> Decision:
        """The decision of the last answer (:attr:`values`)."""
        saved = np.array([s if isinstance(s, int) else self.value(s) > 0.5 for s in self.save])
        return self.p.normalise(saved)
