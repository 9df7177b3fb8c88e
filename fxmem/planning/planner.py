"""Plan a joint graph under a byte budget: choose what to save, split, and check the result.

1. Label the joint graph and price its nodes (cost model).
2. Build the recompute problem (plain data) and solve it for the budget.
3. Split the joint graph with the chosen save-set (recompute pass) and simulate the forward and
   backward graphs with the memory model -- the exact check of the solver's linear model. If the
   simulated peak is over budget, add what the linear model missed to its base at the positions
   where it missed it (the simulation's points mapped to the joint graph's), and solve again.

A budget at or above the unoptimised peak recomputes nothing. A budget under the smallest peak
any plan reaches raises :class:`BudgetError` naming that floor and what holds it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import numpy as np
import torch
import torch.fx

from fxmem.budget import BudgetError, format_bytes
from fxmem.cost.model import DeviceSpec, compute_time, graph_costs, profile_costs, spec_for
from fxmem.graph.joint import step_from_joint
from fxmem.memory.simulation import MemoryTimeline, simulate
from fxmem.passes.recompute import RecomputeRecord, split_with_saved
from fxmem.passes.rng_replay import replay_random_ops
from fxmem.memory.plan_storages import plan_storages
from fxmem.levers.recompute.problem import build_problem, saved_nodes
from fxmem.solver import checkpoint_blocks, greedy, min_peak, save_all, solve_ilp
from fxmem.solver.result import RecomputeSolution

__all__ = ["PlanOptions", "Plan", "plan_joint", "default_margin", "model_miss", "LEVERS"]

log = logging.getLogger(__name__)

LEVERS = frozenset({"recompute", "microbatch", "precision", "sparse"})
_IMPLEMENTED = frozenset({"recompute"})
STRATEGIES = ("ilp", "greedy", "checkpoint-blocks", "save-all")


def default_margin(lowering: str, device: torch.device | str) -> float:
    """The planning margin (a fraction of the budget) when the user gives none: 1%, and 3% for
    Inductor off the CPU. On the CPU, with Inductor's channels-last copies, buffer pool and the C++
    backend's kernel groups modelled, measured peaks equal the model's to 0.1 MiB or fall under
    it on the three bench workloads (33 of 33 runs in bench/results/recompute_peers.md); Triton's
    buffers have not been measured against the model, so it keeps a wider margin."""
    if lowering == "inductor" and torch.device(device).type != "cpu":
        return 0.03
    return 0.01


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """How to plan. ``optimizer_state`` and ``optimizer_step`` are the bytes an optimizer holds
    throughout and allocates in ``step()`` (see :mod:`fxmem.optimizer_memory`)."""

    budget: int
    allow: frozenset[str] = frozenset({"recompute"})
    strategy: str = "ilp"
    time_limit: float = 30.0
    gap: float = 0.02
    safety_margin: float | None = 0.0  # None: default_margin(lowering, the step's device)
    optimizer_state: int = 0
    optimizer_step: int = 0
    device_spec: DeviceSpec | None = None
    cost: str = "roofline"  # or "profile": time the graph's ops on the device (slower to plan)
    max_rounds: int = 6
    lowering: str = "eager"  # how the graphs run, so how memory is modelled: "eager" | "inductor"
    # (category, bytes) held throughout beyond the graph's own, e.g. a microbatched step's
    # gradient buffers and the rest of the whole batch's inputs and outputs
    extra_resident: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        unknown = set(self.allow) - LEVERS
        if unknown:
            raise ValueError(f"unknown levers {sorted(unknown)}; the levers are {sorted(LEVERS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.safety_margin is not None and not 0.0 <= self.safety_margin < 0.5:
            raise ValueError("safety_margin must be in [0, 0.5)")
        if self.lowering not in ("eager", "inductor"):
            raise ValueError(f"lowering must be 'eager' or 'inductor', got {self.lowering!r}")
        if self.cost not in ("roofline", "profile"):
            raise ValueError(f"cost must be 'roofline' or 'profile', got {self.cost!r}")


@dataclasses.dataclass
class Plan:
    """The decision for one input signature and what it predicts."""

    options: PlanOptions
    solution: RecomputeSolution
    record: RecomputeRecord
    predicted_peak: int
    unoptimized_peak: int
    timeline: MemoryTimeline
    graphs: dict[str, torch.fx.GraphModule]
    candidates: int
    plan_seconds: float
    microbatch: object | None = None  # fxmem.levers.microbatch.runtime.MicrobatchReport when microbatched

    @property
    def budget(self) -> int:
        return self.options.budget

    def report(self) -> str:
        from fxmem.planning.report import format_plan

        return format_plan(self)


def _solve(strategy: str, problem, target: int, options: PlanOptions) -> RecomputeSolution:
    if strategy == "ilp":
        return solve_ilp(problem, target, time_limit=options.time_limit, gap=options.gap)
    if strategy == "greedy":
        return greedy(problem, target)
    if strategy == "checkpoint-blocks":
        return checkpoint_blocks(problem, target)
    return save_all(problem, target)


def plan_joint(
    joint: torch.fx.GraphModule,
    *,
    num_fwd_outputs: int,
    static_input_indices: set[int] | frozenset[int],
    options: PlanOptions,
) -> Plan:
    """Plan ``joint`` (an AOTAutograd joint graph) under ``options.budget``."""
    t0 = time.perf_counter()
    unsupported = set(options.allow) - _IMPLEMENTED
    if unsupported:
        log.info("levers %s are not applied by the graph planner (fxmem.optimize microbatches; "
                 "precision and sparse are not implemented yet)", sorted(unsupported))
    step = step_from_joint(joint, num_fwd_outputs=num_fwd_outputs,
                           static_input_indices=static_input_indices)
    if options.safety_margin is None:
        options = dataclasses.replace(
            options, safety_margin=default_margin(options.lowering, step.device))
    spec = options.device_spec or spec_for(step.device)
    constant = {"optimizer state": options.optimizer_state} if options.optimizer_state else {}
    for category, nbytes in options.extra_resident:
        constant[category] = constant.get(category, 0) + int(nbytes)
    epilogue = [("optimizer.step", {"temporaries": options.optimizer_step})] \
        if options.optimizer_step else []
    costs = profile_costs(joint, step.device) if options.cost == "profile" \
        else graph_costs(joint, spec)
    pmap = build_problem(step, costs, constant=constant, epilogue=epilogue, replay_random=True,
                         lowering=options.lowering,
                         fused_cost=functools.partial(compute_time, spec=spec))

    def realise(solution: RecomputeSolution):
        names = saved_nodes(pmap, solution.decision.saved)
        fw, bw, record = split_with_saved(joint, names, num_fwd_outputs=num_fwd_outputs,
                                          buffers=step.buffer_names)
        rng = replay_random_ops(fw, bw, num_fwd_outputs=num_fwd_outputs)
        record = dataclasses.replace(record, replayed=rng.replayed)
        storages = plan_storages(step, fw, bw, num_fwd_outputs=num_fwd_outputs,
                                 lowering=options.lowering)
        return fw, bw, record, simulate(storages, constant=constant, epilogue=epilogue)

    base_solution = save_all(pmap.problem, options.budget)
    fw, bw, record, timeline = realise(base_solution)
    base = (base_solution, fw, bw, record, timeline)
    unoptimized = timeline.peak
    solution = base_solution
    # the simulated peak must leave the margin free: room for what the memory model misses
    limit = int(options.budget * (1.0 - options.safety_margin))
    if unoptimized > limit and "recompute" not in options.allow:
        if unoptimized <= options.budget:
            log.warning("without recomputation the step needs %s, under the budget of %s but "
                        "not under its %.0f%% planning margin", format_bytes(unoptimized),
                        format_bytes(options.budget), 100 * options.safety_margin)
        else:
            raise BudgetError(
                f"the step needs {format_bytes(unoptimized)} without recomputation, over the budget "
                f"of {format_bytes(options.budget)}, and allow= does not include 'recompute'",
                floor=unoptimized, holders=timeline.breakdown(), unoptimized=unoptimized,
            )
    elif unoptimized > limit:  # the margin holds for the unrewritten step too
        best, missed = _fit(pmap, realise, limit, options)
        if best is None:  # the linear model misled the solver: the smallest-peak plan
            # first as a 1-byte budget finds it (the floor BudgetError reports: a budget over it
            # must fit), then fed with what the rounds' plans missed
            floor = _smallest_peak(pmap, realise, np.zeros_like(missed), limit, options)
            if floor[4].peak > limit and missed.any():
                fed = _smallest_peak(pmap, realise, missed, limit, options)
                floor = min(floor, fed, key=lambda t: t[4].peak)
            if floor[4].peak <= limit:
                best = floor
            elif unoptimized <= options.budget:  # at or above the unoptimised peak: as it is
                log.warning("no plan leaves the %.0f%% planning margin under the budget of %s; "
                            "at or above the unoptimised peak (%s), nothing is recomputed",
                            100 * options.safety_margin, format_bytes(options.budget),
                            format_bytes(unoptimized))
                best = base
            else:
                raise _budget_error(min(floor[4], base[4], key=lambda t: t.peak), options,
                                    unoptimized)
        solution, fw, bw, record, timeline = best
    graphs = {"joint": joint, "forward": fw, "backward": bw}
    return Plan(options=options, solution=solution, record=record, predicted_peak=timeline.peak,
                unoptimized_peak=unoptimized, timeline=timeline, graphs=graphs,
                candidates=pmap.problem.num_candidates, plan_seconds=time.perf_counter() - t0)


def _fit(pmap, realise, limit: int, options: PlanOptions):
    """Solve, realise and simulate until the simulated peak is at most ``limit``; then spend what
    is left under it, recomputing less, while the plans get cheaper and still fit. Returns the
    cheapest fitting plan (or None) and what the model missed, per position (see
    :func:`model_miss`)."""
    problem, target = pmap.problem, limit
    missed = np.zeros(problem.num_positions, dtype=np.int64)  # what the model missed, where
    best = None
    for round_ in range(options.max_rounds):
        solution = _solve(options.strategy, problem, target, options)
        if not solution.feasible:
            break
        realised = (solution, *realise(solution))
        peak = realised[4].peak
        log.debug("plan round %d: model peak %d, simulated %d, budget %d", round_,
                  solution.peak, peak, options.budget)
        if peak <= limit:
            if best is not None and best[0].recompute_time <= solution.recompute_time:
                break
            best = realised
            # a plan far under the limit recomputes more than it must (the corrections below
            # hold for the decision they came from, not every other), and its peak can fall
            # under a tighter budget's: give the solver the slack
            if limit - peak <= options.budget // 200:
                break
            target += limit - peak
            continue
        if best is not None:  # spending the slack overshot: keep the plan that fit
            break
        # the simulated excess is where the linear model is low, often far from the model's own
        # peak: a lower target alone would not move it. Add the miss there, the largest seen at
        # each position, so the next round avoids it; and tighten by a growing step (0.25%,
        # 0.5%, ... of the budget) so a miss by a few bytes is not met again
        missed = np.maximum(missed, model_miss(pmap.problem, pmap.labels, solution.decision,
                                               realised[4]))
        problem = _with_missed(pmap, missed)
        target = limit - ((options.budget // 400) << round_)
    return best, missed


def _smallest_peak(pmap, realise, missed: np.ndarray, limit: int, options: PlanOptions,
                   passes: int = 3):
    """The realised plan with the smallest simulated peak found by ``min_peak``, fed with what
    the model missed (``missed``, then for each pass's plan): the floor a BudgetError reports."""
    best = None
    for _ in range(passes):
        solution = min_peak(_with_missed(pmap, missed), time_limit=options.time_limit, gap=0.01)
        realised = (solution, *realise(solution))
        if best is None or realised[4].peak < best[4].peak:
            best = realised
        if best[4].peak <= limit:
            break
        missed = np.maximum(missed, model_miss(pmap.problem, pmap.labels, solution.decision,
                                               realised[4]))
    return best


def _with_missed(pmap, missed: np.ndarray):
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


def _budget_error(timeline: MemoryTimeline, options: PlanOptions, unoptimized: int) -> BudgetError:
    """The error for a budget under the smallest peak found, as the budget that would be met
    (the planning margin included) and what holds it."""
    floor = int(-(-timeline.peak // (1.0 - options.safety_margin)))
    holders = {k: v for k, v in timeline.breakdown().items() if v}
    held = " + ".join(f"{k} {format_bytes(v)}" for k, v in
                      sorted(holders.items(), key=lambda kv: -kv[1]))
    return BudgetError(
        f"no plan fits the budget of {format_bytes(options.budget)} "
        f"(strategy {options.strategy}): the smallest feasible budget is about "
        f"{format_bytes(floor)} ({floor} bytes), held at its peak by {held}; with nothing "
        f"recomputed the step needs {format_bytes(unoptimized)}",
        floor=floor, holders=holders, unoptimized=unoptimized,
    )


def optimizer_bytes(optimizer, grad_params) -> tuple[int, int]:
    """(state bytes, step temporaries) of an optimizer, for PlanOptions."""
    from fxmem.memory.optimizer import optimizer_memory

    if optimizer is None:
        return 0, 0
    with_grad = {id(p) for p in grad_params}
    mem = optimizer_memory(optimizer, has_grad=lambda p: id(p) in with_grad)
    return mem.state_bytes, mem.step_peak_bytes
