"""Choose the number of microbatches jointly with recomputation: the fastest predicted pair.

For each candidate k (1, 2, 4, ... up to the batch) the step is captured at the microbatch's size
and its recompute problem solved under the budget, with what microbatching adds held throughout:
the gradient buffers the microbatches accumulate into, and the whole batch's inputs and held
outputs beyond one microbatch's. The predicted time of k is k microbatch steps (the cost model's
time of every op, launch overhead included, so small microbatches cost more) plus their
recomputation. The search stops at the first k that needs no recomputation: a larger k only adds
per-op overhead. The forward+backward graphs of the chosen k are then planned exactly by the
backend, like any other step.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from fxmem.graph.torch_compat import pytree
from fxmem.levers.microbatch.analysis import BatchAnalysis
from fxmem.planning.options import PlanOptions, StepContext
from fxmem.graph.capture import capture_step
from fxmem.cost.model import graph_costs, spec_for
from fxmem.levers.microbatch.runtime import (accumulated_gradient_bytes, microbatch_part,
                                             part_is_view, split_sizes)
from fxmem.passes.microbatch_draws import cache_bytes
from fxmem.levers.recompute.problem import build_problem
from fxmem.solver import greedy, min_peak, save_all, solve_ilp
from fxmem.memory.simulation import Category

__all__ = ["MicrobatchOption", "MicrobatchChoice", "choose_microbatches", "extra_resident",
           "CANDIDATES", "candidate_ks"]

log = logging.getLogger(__name__)

#: The microbatch counts the lever considers, those up to the batch size (the last microbatch may
#: be smaller: :func:`~fxmem.levers.microbatch.runtime.split_sizes`).
CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def candidate_ks(batch: int) -> list[int]:
    """The microbatch counts considered for a batch of ``batch`` samples, 1 first."""
    return [k for k in CANDIDATES if k <= batch]


@dataclasses.dataclass(frozen=True)
class MicrobatchOption:
    """One candidate k as predicted (the linear model of the captured microbatch step)."""

    k: int
    sizes: tuple[int, ...]
    feasible: bool
    predicted_peak: int  # bytes, with what microbatching holds throughout
    step_seconds: float  # k microbatch steps, recomputation included
    recompute_seconds: float
    floor: int | None = None  # the model's smallest peak at this k (when no k fits)


@dataclasses.dataclass(frozen=True)
class MicrobatchChoice:
    k: int
    sizes: tuple[int, ...]
    options: tuple[MicrobatchOption, ...]
    seconds: float  # spent choosing

    @property
    def feasible(self) -> bool:
        return any(o.feasible and o.k == self.k for o in self.options)

    def summary(self) -> str:
        rows = [f"k={o.k}: {'fits' if o.feasible else 'over budget'}, predicted peak "
                f"{o.predicted_peak / 2**20:.1f} MiB, step {1e3 * o.step_seconds:.1f} ms "
                f"(recompute {1e3 * o.recompute_seconds:.1f} ms)" for o in self.options]
        return f"chose k={self.k} ({list(self.sizes)}) of: " + "; ".join(rows)


def extra_resident(tensors, held_bytes: int, sizes, dims, params,
                   draw_bytes: int = 0) -> dict[str, int]:
    """Bytes a microbatched step holds beyond its microbatch graph's own: the gradient buffers,
    the rest of the whole batch's inputs, the buffer the held outputs are gathered into (the
    whole batch's; each microbatch's own output is the graph's) and the whole batch's random
    draws the microbatches read (``draw_bytes``, at most, from the first microbatch: counted as
    saved activations held throughout).

    An input the runtime hands each microbatch as a view of the whole batch's (``narrow`` along
    its batch dim) is counted whole by the microbatch's graph already: its placeholder's storage
    is the whole batch's, so nothing more. Only an input the runtime copies (a contiguous one
    whose slice is not: :func:`~fxmem.levers.microbatch.runtime.microbatch_part`) holds the rest
    of the batch beyond the microbatch's copy."""
    if len(sizes) == 1:
        return {}
    total, first = sum(sizes), sizes[0]
    inputs = sum(t.untyped_storage().nbytes() * (1 - first / total)
                 for t, d in zip(tensors, dims)
                 if d is not None and not part_is_view(t, d, 0, first))
    # held outputs: the whole batch's buffer they are gathered into, beside each microbatch's own
    return {Category.GRADIENTS: accumulated_gradient_bytes(params), Category.INPUTS: int(inputs),
            Category.OUTPUTS: int(held_bytes), Category.SAVED: int(draw_bytes)}


def _with_floors(results, problems, options: PlanOptions, recompute: bool):
    """``results`` with each k's predicted floor: the smallest peak recomputation reaches, or
    saving everything without it."""
    out = []
    for option, problem in zip(results, problems):
        floor = (min_peak(problem, time_limit=options.time_limit, gap=0.01) if recompute
                 else save_all(problem)).peak
        out.append(dataclasses.replace(option, floor=int(floor)))
        log.info("microbatch k=%d: predicted floor %d", option.k, floor)
    return out


def _part(leaves, slots, dims, start: int, n: int):
    """The microbatch's inputs as the runtime hands them over (views, or copies)."""
    out = list(leaves)
    for slot, d in zip(slots, dims):
        out[slot] = microbatch_part(leaves[slot], d, start, n)
    return out


def choose_microbatches(model, leaves, spec, slots, *, analysis: BatchAnalysis,
                        options: PlanOptions, context: StepContext = StepContext(),
                        loss_fn=None, held_bytes: int = 0, candidates=None,
                        whole=None, find_floor: bool = True) -> MicrobatchChoice:
    """The k (and microbatch sizes) with the least predicted step time whose predicted peak fits
    the budget less its margin; k = 1 if none does (the backend then names the floor). Each k is
    priced on the model the plan then uses: the same lowering, solver time limit and context
    (optimizer state and step) as ``options`` and ``context``. Without ``"recompute"`` in
    ``options.allow``, microbatching alone (every k saves everything). ``whole``: the step
    already captured at the whole batch (k = 1), not captured again.

    When no k fits (and ``find_floor``), the choice is the k with the smallest predicted floor (the linear model's
    smallest peak with recomputation): the backend then plans that k and its BudgetError names
    the smallest budget any allowed lever reaches, not only the whole batch's."""
    t0 = time.perf_counter()
    batch = analysis.batch_size
    dims = analysis.flat_batch_dims
    params = [p for p in model.parameters() if p.requires_grad]
    recompute = "recompute" in options.allow
    target = options.limit_for(whole.device if whole is not None else "cpu")
    ks = candidates or candidate_ks(batch)
    results: list[MicrobatchOption] = []
    problems = []
    spec_ = None
    for k in ks:
        sizes = tuple(split_sizes(batch, k))
        if k == 1 and whole is not None:
            step = whole
        else:
            args, kwargs = pytree.tree_unflatten(_part(leaves, slots, dims, 0, sizes[0]), spec)
            step = capture_step(model, args, kwargs, loss_fn=loss_fn)
        spec_ = spec_ or spec_for(step.device)
        costs = graph_costs(step.gm, spec_)
        held = context.plus(extra_resident([leaves[s] for s in slots], held_bytes, sizes, dims,
                                           params, cache_bytes(analysis.draws, sizes)))
        problem = build_problem(step, costs, constant=held.constant,
                                epilogue=held.epilogue_points, replay_random=True,
                                lowering=options.lowering).problem
        problems.append(problem)
        base = save_all(problem)
        if base.peak <= target or not recompute:
            sol = base
        else:
            sol = solve_ilp(problem, target, time_limit=options.time_limit)
            if not sol.feasible:
                sol = greedy(problem, target)
        feasible = sol.feasible and sol.peak <= target
        step_time = sum(costs.values())
        option = MicrobatchOption(k, sizes, feasible, int(sol.peak),
                                  k * (step_time + sol.recompute_time), k * sol.recompute_time)
        results.append(option)
        log.info("microbatch k=%d: predicted peak %d, %s, step %.4fs", k, option.predicted_peak,
                 "fits" if feasible else "over", option.step_seconds)
        if feasible and sol.recompute_time == 0:
            break  # a larger k only adds per-op overhead
    fits = [o for o in results if o.feasible]
    if fits:
        best = min(fits, key=lambda o: o.step_seconds)
    elif not find_floor or len(results) == 1:
        best = results[0]
    else:
        results = _with_floors(results, problems, options, recompute)
        best = min(results, key=lambda o: (o.floor, o.k))
    return MicrobatchChoice(best.k, best.sizes, tuple(results), time.perf_counter() - t0)

