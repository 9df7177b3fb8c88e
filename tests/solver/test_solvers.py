"""Solvers on plain data: the ILP against brute force on small problems, and the baselines."""

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxmem.solver import (RecomputeProblem, checkpoint_blocks, greedy, min_peak, save_all,
                          solve_ilp)
from fxmem.solver.problem import Pull


def chain_problem(sizes, costs, *, must=(), blocks=None, base=1000):
    """A forward chain v0 -> v1 -> ... each read by the backward in reverse order (like layers):
    value i is made at forward position i and read at backward position 2n - 1 - i."""
    n = len(sizes)
    positions = 2 * n
    inputs = tuple(((i - 1,) if i else ()) for i in range(n))
    need = np.array([2 * n - 1 - i for i in range(n)])
    base_arr = np.full(positions, base, dtype=np.int64)
    for i, s in enumerate(sizes):  # each value is live during its own forward position
        base_arr[i] += s
    pulls = tuple(Pull(target=i - 1, by=i, start=int(need[i]), interior=(), far=False)
                  for i in range(1, n) if need[i] < need[i - 1])
    return RecomputeProblem(
        names=tuple(f"v{i}" for i in range(n)),
        size=np.array(sizes, dtype=np.int64),
        cost=np.array(costs, dtype=np.float64),
        fwd_end=np.arange(n),
        need_start=need.copy(),
        need_end=need.copy(),
        direct=np.ones(n, dtype=bool),
        inputs=inputs,
        must_save=np.isin(np.arange(n), list(must)),
        never_save=np.zeros(n, dtype=bool),
        base=base_arr,
        backward_start=n,
        block=np.array(blocks if blocks is not None else [-1] * n),
        pulls=pulls,
    )


def brute_force(problem, budget):
    """The cheapest decision under the linear model, by enumeration."""
    best = None
    for bits in itertools.product([False, True], repeat=problem.num_candidates):
        decision = problem.normalise(np.array(bits))
        if problem.peak(decision) <= budget:
            cost = problem.recompute_time(decision)
            if best is None or cost < best - 1e-12:
                best = cost
    return best


def test_save_all_recomputes_nothing_and_is_the_unoptimised_peak():
    p = chain_problem([100, 200, 300], [1e-3, 2e-3, 3e-3])
    sol = save_all(p, budget=10**6)
    assert sol.num_recomputed == 0 and sol.recompute_time == 0.0
    assert sol.peak == 1000 + 600 and sol.feasible


def test_ilp_recomputes_nothing_when_the_budget_allows():
    p = chain_problem([100, 200, 300], [1e-3, 2e-3, 3e-3])
    sol = solve_ilp(p, budget=save_all(p).peak)
    assert sol.num_recomputed == 0 and sol.status == "optimal"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 500), min_size=2, max_size=7),
    costs=st.lists(st.floats(1e-6, 1e-2), min_size=7, max_size=7),
    slack=st.floats(0.0, 1.0),
)
def test_ilp_matches_brute_force(sizes, costs, slack):
    p = chain_problem(sizes, costs[: len(sizes)])
    floor = min(p.peak(p.normalise(np.array(bits)))
                for bits in itertools.product([False, True], repeat=len(sizes)))
    top = save_all(p).peak
    budget = int(floor + slack * (top - floor))
    expected = brute_force(p, budget)
    sol = solve_ilp(p, budget, gap=0.0, time_limit=20)
    assert sol.feasible and sol.peak <= budget
    assert sol.recompute_time == pytest.approx(expected, rel=1e-6, abs=1e-12)
    heuristic = greedy(p, budget)
    if heuristic.feasible:  # a heuristic that meets the budget is never cheaper than the optimum
        assert heuristic.recompute_time >= expected - 1e-12


def test_ilp_finds_an_optimum_that_meets_a_row_exactly():
    # CBC's preprocessing called this infeasible at its floor (1226 B): saving v0 and v2 and
    # recomputing v1 peaks at exactly the budget
    p = chain_problem([76, 150, 77], [0.00390625, 0.0078125, 0.0078125])
    floor = min(p.peak(p.normalise(np.array(bits)))
                for bits in itertools.product([False, True], repeat=3))
    sol = solve_ilp(p, floor, gap=0.0)
    assert sol.status == "optimal" and sol.peak <= floor
    assert sol.recompute_time == pytest.approx(brute_force(p, floor))


def test_infeasible_budget_and_min_peak():
    p = chain_problem([100, 200, 300, 400], [1e-3] * 4)
    floor = min(p.peak(p.normalise(np.array(bits)))
                for bits in itertools.product([False, True], repeat=4))
    assert min_peak(p).peak == floor
    sol = solve_ilp(p, floor - 1)
    assert sol.status == "infeasible" and not sol.feasible


def test_must_save_is_never_recomputed():
    p = chain_problem([100, 200, 300, 400], [1e-3] * 4, must=(1,))
    for sol in (solve_ilp(p, 1200), greedy(p, 1200), min_peak(p)):
        assert sol.decision.saved[1]


def test_checkpoint_blocks_saves_what_leaves_a_block():
    p = chain_problem([100] * 6, [1e-3] * 6, blocks=[0, 0, 0, 1, 1, 1])
    sol = checkpoint_blocks(p)
    # v2 feeds block 1 (saved); inside blocks nothing else is saved unless needed as input
    assert sol.decision.saved[2]
    assert sol.num_recomputed > 0
    assert sol.strategy == "checkpoint-blocks"


def test_every_strategy_returns_the_same_type():
    p = chain_problem([100, 200, 300], [1e-3, 2e-3, 3e-3])
    sols = [save_all(p, 1500), checkpoint_blocks(p, 1500), greedy(p, 1500), solve_ilp(p, 1500)]
    assert {type(s) for s in sols} == {type(sols[0])}
    assert all(s.budget == 1500 for s in sols)


def test_problem_validates_its_data():
    p = chain_problem([100, 200], [1e-3, 1e-3])
    with pytest.raises(ValueError, match="one entry per candidate"):
        RecomputeProblem(**{**p.__dict__, "size": np.array([1, 2, 3])})


def _reference_memory(problem, decision):
    """The linear model written out one pull at a time (what the vectorised one must equal)."""
    memory = problem.base.astype(np.int64).copy()
    for i in np.flatnonzero(decision.saved):
        memory[problem.fwd_end[i] + 1: problem.need_end[i] + 1] += problem.size[i]
    for i in np.flatnonzero(decision.recomputed):
        memory[problem.need_start[i]: problem.need_end[i] + 1] += problem.again_size[i]
        memory[problem.need_start[i]] += problem.transient[i]
    earliest = {}
    for p in problem.pulls:
        active = (decision.recomputed[p.by] and not decision.saved[p.target]
                  and not decision.saved[list(p.interior)].any())
        if active and not p.far and p.start < problem.need_start[p.target]:
            earliest[p.target] = min(earliest.get(p.target, p.start), p.start)
    for i, start in earliest.items():
        memory[start: problem.need_start[i]] += problem.again_size[i]
    return memory


@st.composite
def pulled_chains(draw):
    """Chains whose recomputation pulls earlier values, some through interior values, some far."""
    n = draw(st.integers(3, 8))
    p = chain_problem(draw(st.lists(st.integers(1, 500), min_size=n, max_size=n)),
                      draw(st.lists(st.floats(1e-6, 1e-2), min_size=n, max_size=n)))
    pulls = []
    for by in range(2, n):
        for target in range(by - 1):
            if draw(st.booleans()):
                interior = tuple(range(target + 1, by))
                pulls.append(Pull(target=target, by=by, start=int(p.need_start[by]),
                                  interior=interior, far=draw(st.booleans())))
    # some recomputations allocate scratch at their first need (dropout's noise on the CPU)
    transient = np.array(draw(st.lists(st.sampled_from([0, 0, 50, 400]), min_size=n, max_size=n)))
    return dataclasses.replace(p, pulls=p.pulls + tuple(pulls), transient=transient)


@settings(max_examples=40, deadline=None)
@given(problem=pulled_chains(), bits=st.lists(st.booleans(), min_size=8, max_size=8))
def test_memory_equals_the_model_written_out(problem, bits):
    saved = np.array(bits[: problem.num_candidates])
    decision = problem.normalise(saved)
    assert not any(p.far for p in problem.pulls
                   if decision.recomputed[p.by] and not decision.saved[p.target]
                   and not decision.saved[list(p.interior)].any())  # normalise cut far pulls
    np.testing.assert_array_equal(problem.memory(decision), _reference_memory(problem, decision))


@settings(max_examples=40, deadline=None)
@given(problem=pulled_chains(), fraction=st.floats(0.0, 1.0))
def test_greedy_never_raises_the_peak_and_stops(problem, fraction):
    # far pulls force values given up back into the saved set: the greedy once chose the same
    # value again and again until its step limit, and took steps that raised the peak
    floor = min(problem.peak(problem.normalise(np.array(bits)))
                for bits in itertools.product([False, True], repeat=problem.num_candidates))
    top = save_all(problem).peak
    budget = int(floor + fraction * (top - floor))
    sol = greedy(problem, budget, max_steps=problem.num_candidates)
    assert sol.peak <= top
    if sol.feasible:
        assert sol.recompute_time >= brute_force(problem, budget) - 1e-12
        return
    # it stops over budget only where giving up any value alive at the peak does not help
    memory = problem.memory(sol.decision)
    t = int(np.argmax(memory))
    alive = sol.decision.saved & (problem.fwd_end < t) & (t <= problem.need_end)
    for i in np.flatnonzero(alive & ~problem.must_save):
        saved = sol.decision.saved.copy()
        saved[i] = False
        trial = problem.memory(problem.normalise(saved))
        assert trial[t] >= memory[t] or trial.max() > memory[t]


@settings(max_examples=15, deadline=None)
@given(problem=pulled_chains(), fraction=st.floats(0.0, 1.0))
def test_ilp_is_optimal_with_pulls_and_transients(problem, fraction):
    # the ILP's rows must count what the memory model counts: pulled values and scratch
    peaks = [problem.peak(problem.normalise(np.array(bits)))
             for bits in itertools.product([False, True], repeat=problem.num_candidates)]
    budget = int(min(peaks) + fraction * (max(peaks) - min(peaks)))
    sol = solve_ilp(problem, budget, gap=0.0, time_limit=20)
    assert sol.feasible and sol.peak <= budget
    assert sol.recompute_time == pytest.approx(brute_force(problem, budget), rel=1e-6, abs=1e-12)
    assert min_peak(problem).peak == min(peaks)


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_both_solvers_find_the_brute_force_optimum(solver, monkeypatch):
    """HiGHS (highspy, the default) and CBC (PuLP's, where highspy is not installed) solve the
    same rows to the same optimum, with the status and gap each reports."""
    import fxmem.solver.ilp as ilp

    monkeypatch.setattr(ilp, "_HIGHS", solver == "highs")
    p = chain_problem([300, 120, 500, 80, 260, 410], [0.004, 0.001, 0.009, 0.002, 0.003, 0.006])
    floor = min(p.peak(p.normalise(np.array(bits)))
                for bits in itertools.product([False, True], repeat=6))
    budget = floor + (save_all(p).peak - floor) // 3
    sol = solve_ilp(p, budget, gap=0.0, time_limit=20)
    assert sol.status == "optimal" and sol.gap == pytest.approx(0.0, abs=1e-9)
    assert sol.peak <= budget
    assert sol.recompute_time == pytest.approx(brute_force(p, budget), rel=1e-6)
    assert min_peak(p, time_limit=20).peak == floor


def test_an_identical_problem_gets_the_kept_answer(monkeypatch):
    """A time-limited solve can end differently each time; the same problem and arguments get
    the first answer again (plan_for then the call plan the same), a changed one is solved."""
    import fxmem.solver.ilp as ilp
    from fxmem.solver.memo import clear_solutions, fingerprint

    calls = []
    real = ilp._solve

    def counted(model, time_limit, gap):
        calls.append(len(model.rows))
        return real(model, time_limit, gap)

    monkeypatch.setattr(ilp, "_solve", counted)
    clear_solutions()
    p = chain_problem([300, 120, 500, 80], [0.004, 0.001, 0.009, 0.002])
    budget = save_all(p).peak - 200
    first = solve_ilp(p, budget, time_limit=5)
    n = len(calls)
    assert n > 0 and solve_ilp(p, budget, time_limit=5) is first and len(calls) == n
    assert solve_ilp(p, budget - 1, time_limit=5) is not first and len(calls) > n
    same = chain_problem([300, 120, 500, 80], [0.004, 0.001, 0.009, 0.002])
    other = chain_problem([300, 120, 500, 81], [0.004, 0.001, 0.009, 0.002])
    assert fingerprint(same) == fingerprint(p) != fingerprint(other)
    assert min_peak(p, time_limit=5) is min_peak(same, time_limit=5)


def test_a_solve_prints_nothing():
    """HiGHS's banner (printed by the C library at a process's first Highs()) does not reach the
    user's stdout: a fresh process that solves prints only what it prints itself."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        from tests.solver.test_solvers import chain_problem
        from fxmem.solver import save_all, solve_ilp
        p = chain_problem([300, 120, 500, 80], [0.004, 0.001, 0.009, 0.002])
        sol = solve_ilp(p, save_all(p).peak - 200, time_limit=5)
        print("status", sol.status)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out == "status optimal\n"


def test_a_budget_under_the_base_is_infeasible_without_a_solve(monkeypatch):
    """Every position holds its base whatever is recomputed: a budget under it (a floor search's
    1 byte) gets the answer the solver gives, without building the model."""
    import fxmem.solver.ilp as ilp
    from fxmem.solver.memo import clear_solutions

    clear_solutions()
    p = chain_problem([300, 120, 500, 80], [0.004, 0.001, 0.009, 0.002])
    with monkeypatch.context() as m:
        m.setattr(ilp, "_base_over", lambda problem, budget: False)  # the solver says so
        solved = solve_ilp(p, 1, time_limit=5)
    clear_solutions()
    monkeypatch.setattr(ilp, "_Model", None)  # building it would fail
    quick = solve_ilp(p, 1, time_limit=5)
    assert quick.status == solved.status == "infeasible" and not quick.feasible
    assert (quick.decision.saved == solved.decision.saved).all() and quick.peak == solved.peak
    clear_solutions()
