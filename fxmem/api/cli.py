"""The ``fxmem`` command line: ``fxmem estimate MODULE:FACTORY``, ``fxmem plan ...`` and
``fxmem inspect ...``."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from fxmem.budget import BudgetError
from fxmem.errors import FxmemError

__all__ = ["main"]


def _estimate(ns: argparse.Namespace) -> int:
    from fxmem.planning.report import format_comparison, plot_memory
    from fxmem.api.workload import load_workload

    workload = load_workload(ns.factory)
    est = workload.estimate()
    measured = None if ns.no_measure else workload.measure()
    row = {"name": workload.name, "estimate": est, "measured": measured}
    opt = f", optimizer {est.optimizer.name}" if est.optimizer else ", no optimizer"
    print(f"fxmem estimate: {workload.name} on {est.device}{opt} (one steady-state iteration)")
    print(format_comparison([row]))
    if ns.plot:
        print(f"plot: {plot_memory(est, measured, ns.plot, title=workload.name)}")
    if ns.json:
        record = {
            "name": workload.name,
            "device": str(est.device),
            "predicted_peak": est.peak,
            "peak_at": est.peak_at,
            "peak_phase": est.peak_phase,
            "breakdown": est.breakdown(),
            "measured_peak": None if measured is None else measured.peak,
        }
        with open(ns.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


_NO_LIMIT = 2**62  # a budget no step reaches: the plan saves everything


def _relative_budget(text: str) -> float | None:
    """``"55%"`` -> 0.55 (a fraction of the unoptimised peak); None for an absolute budget."""
    text = text.strip()
    if not text.endswith("%"):
        return None
    try:
        fraction = float(text[:-1]) / 100.0
    except ValueError:
        fraction = float("nan")
    if not 0.0 < fraction < float("inf"):
        raise BudgetError(f"cannot read budget {text!r}: a relative budget is a positive "
                          "percentage of the unoptimised peak, e.g. '55%'")
    return fraction


def _recomputed_ops(record) -> str:
    """The forward ops the backward runs again, counted by op (node names without their index)."""
    counts: dict[str, int] = {}
    for name in record.recomputed:
        op = re.sub(r"_\d+$", "", name)
        counts[op] = counts.get(op, 0) + 1
    if not counts:
        return "nothing"
    ops = ", ".join(f"{op} x{n}" if n > 1 else op
                    for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    random = f", {len(record.replayed)} random (replayed)" if record.replayed else ""
    return f"{len(record.recomputed)} forward ops{random}: {ops}"


def _run_planned(workload, budget: int, ns: argparse.Namespace, forced: dict | None = None):
    """Optimize the workload's model at ``budget``, run one step (it plans and compiles), then
    measure one steady-state step. Returns the plan and the measurement. ``forced``: the
    ``fxmem.optimize`` keywords of the joint planner's chosen point (its levers and settings)."""
    import gc

    import fxmem

    levers = forced or {"allow": _allow(ns)}
    model = fxmem.optimize(workload.model, budget, optimizer=workload.optimizer,
                           loss_fn=workload.loss_fn, strategy=ns.strategy, lowering=ns.lowering,
                           **levers)

    def step():
        out = model(*workload.args, **workload.kwargs)
        fxmem.loss_from_output(out).backward()
        if workload.optimizer is not None:
            workload.optimizer.step()
            workload.optimizer.zero_grad(set_to_none=True)

    step()  # plans and compiles on the first call (and creates the optimizer's state)
    workload.zero_grad()
    gc.collect()
    device = next(workload.model.parameters()).device
    # the bytes live at the start are the step's own: the model, its inputs, the optimizer state
    measured = fxmem.measure_memory(step, device=device, baseline=workload.roots())
    workload.zero_grad()
    return model.plan, measured


def _allow(ns: argparse.Namespace) -> tuple[str, ...]:
    """The levers ``--allow`` names (default: the exact ones)."""
    from fxmem.planning.options import EXACT_LEVERS

    return EXACT_LEVERS if ns.allow is None else ns.allow


def _levers(text: str) -> tuple[str, ...]:
    """``--allow recompute,microbatch`` as a tuple of known lever names."""
    from fxmem.planning.options import check_allow

    names = tuple(a.strip() for a in text.split(",") if a.strip())
    try:
        check_allow(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def _check_budget(text: str) -> None:
    """A BudgetError for a budget that is neither a percentage nor bytes."""
    if _relative_budget(text) is None:
        from fxmem.budget import parse_budget

        parse_budget(text)


def _budget_and_before(ns: argparse.Namespace, workload, *, run_before: bool):
    """The budget in bytes (a percentage resolved against the unoptimised peak), its fraction
    (None for an absolute budget), the unoptimised peak, and -- with ``run_before`` -- the
    unoptimised step's plan and measurement (fxmem's step with nothing recomputed)."""
    import fxmem

    fraction = _relative_budget(ns.budget)
    budget = None if fraction is not None else fxmem.parse_budget(ns.budget)
    before = measured_before = unoptimized = None
    if run_before:
        before, measured_before = _run_planned(workload, _NO_LIMIT, ns)
        unoptimized = before.unoptimized_peak
    elif fraction is not None:  # its prediction only
        unoptimized = fxmem.estimate(workload.model, *workload.args, optimizer=workload.optimizer,
                                     loss_fn=workload.loss_fn, lowering=ns.lowering,
                                     **workload.kwargs).peak
    if fraction is not None:
        budget = int(fraction * unoptimized)
    return budget, fraction, unoptimized, before, measured_before


def _inspect(ns: argparse.Namespace) -> int:
    from fxmem.api.inspection import format_inspection, write_inspection
    from fxmem.api.workload import load_workload

    _check_budget(ns.budget)  # before the workload is built
    workload = load_workload(ns.factory)
    budget, _, _, before, measured_before = _budget_and_before(
        ns, workload, run_before=not ns.no_measure)
    if ns.no_measure:
        import fxmem

        module = fxmem.optimize(workload.model, budget, optimizer=workload.optimizer,
                                loss_fn=workload.loss_fn, strategy=ns.strategy,
                                lowering=ns.lowering, allow=_allow(ns))
        plan, measured = module.plan_for(*workload.args, **workload.kwargs), None
    else:
        plan, measured = _run_planned(workload, budget, ns)
    inspection = write_inspection(plan, ns.out, before=before, measured_before=measured_before,
                                  measured=measured, title=f"{workload.name} ({ns.lowering})")
    print(format_inspection(inspection))
    return 0 if measured is None or measured.peak <= plan.budget else 1


def _plan(ns: argparse.Namespace) -> int:
    import time

    from fxmem.budget import format_bytes
    from fxmem.api.workload import load_workload

    t0 = time.perf_counter()
    _check_budget(ns.budget)  # before the workload is built
    workload = load_workload(ns.factory)
    budget, fraction, unoptimized, before, measured_before = _budget_and_before(
        ns, workload, run_before=bool(ns.plot))
    explored = ns.alternatives or ns.pareto or ns.prefer is not None
    exploration = _explore(ns, workload, budget) if explored else None
    if exploration is not None and exploration.chosen is None:
        from fxmem.planning.joint import format_alternatives

        print(format_alternatives(exploration, top=ns.top))
        if ns.pareto:
            print(f"Pareto front: {_pareto(exploration, ns, workload)}")
        floor = (f": the smallest budget any combination meets is {format_bytes(exploration.floor)}"
                 f" ({exploration.floor} bytes)" if exploration.floor is not None else "")
        print(f"fxmem: error: no combination of the allowed levers fits the budget of "
              f"{format_bytes(budget)}{floor}", file=sys.stderr)
        return 2
    forced = exploration.optimize_kwargs() if exploration is not None else None
    plan, measured = _run_planned(workload, budget, ns, forced)
    within = measured.peak <= plan.budget
    print(f"fxmem plan: {workload.name} on {measured.device}, lowering {ns.lowering}")
    if exploration is not None:
        print(f"chosen by the joint planner: {exploration.chosen.levers} "
              f"({exploration.chosen.numerics})")
    print(plan.report())
    print()
    relative = (f" ({100 * fraction:g}% of the unoptimised peak {format_bytes(unoptimized)})"
                if fraction is not None else "")
    rows = [("budget", f"{format_bytes(plan.budget)}{relative}"),
            ("predicted peak", format_bytes(plan.predicted_peak)),
            ("measured peak", f"{format_bytes(measured.peak)} ({measured.peak} bytes)")]
    if measured_before is not None:
        rows.insert(1, ("unoptimised", f"predicted {format_bytes(before.predicted_peak)}, "
                                       f"measured {format_bytes(measured_before.peak)}"))
    rows += [("within budget", "yes" if within else "NO"),
             ("recomputed", _recomputed_ops(plan.record))]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if exploration is not None:
        from fxmem.planning.joint import format_alternatives

        print()
        print(format_alternatives(exploration, top=ns.top))
        if ns.pareto:
            print(f"Pareto front: {_pareto(exploration, ns, workload)}")
    if ns.plot:
        from fxmem.planning.report import plot_plan

        path = plot_plan(before, measured_before, plan, measured, ns.plot,
                         title=f"{workload.name}: unoptimised vs planned ({ns.lowering})")
        print(f"plot: {path}")
    if ns.json:
        _write_plan_json(ns, workload, plan, measured, measured_before, fraction, within,
                         exploration, time.perf_counter() - t0)
    if ns.show_graphs:
        for name in ("forward", "backward"):
            print(f"\n# {name} graph\n{plan.graphs[name].code}")
    print(f"({time.perf_counter() - t0:.1f}s)")
    return 0 if within else 1


def _write_plan_json(ns: argparse.Namespace, workload, plan, measured, measured_before,
                     fraction, within: bool, exploration, seconds: float) -> None:
    """``fxmem plan --json``: the plan's numbers (and the joint planner's points) as JSON."""
    record = {
        "name": workload.name,
        "device": str(measured.device),
        "lowering": ns.lowering,
        "budget": plan.budget,
        "budget_fraction": fraction,
        "unoptimized_peak": plan.unoptimized_peak,
        "unoptimized_measured_peak": None if measured_before is None else measured_before.peak,
        "predicted_peak": plan.predicted_peak,
        "measured_peak": measured.peak,
        "within_budget": within,
        "recomputed": list(plan.record.recomputed),
        "replayed": list(plan.record.replayed),
        "seconds": seconds,
    }
    if exploration is not None:
        import dataclasses

        record["alternatives"] = [dict(dataclasses.asdict(p), exact=p.exact,
                                       chosen=p is exploration.chosen)
                                  for p in exploration.points]
    with open(ns.json, "w") as f:
        json.dump(record, f, indent=2)


def _explore(ns: argparse.Namespace, workload, budget: int):
    """The joint planner's exploration of the allowed levers' combinations under ``budget``."""
    from fxmem.planning.joint import explore

    return explore(workload.model, *workload.args, budget=budget, allow=_allow(ns),
                   optimizer=workload.optimizer, loss_fn=workload.loss_fn, lowering=ns.lowering,
                   time_limit=ns.time_limit, floors=ns.floors, search=ns.search,
                   prefer=ns.prefer or "exact", progress=not ns.no_progress, **workload.kwargs)


def _pareto(exploration, ns: argparse.Namespace, workload) -> str:
    from fxmem.planning.joint import plot_pareto

    return str(plot_pareto(exploration, ns.pareto,
                           title=f"{workload.name}: combinations planned ({ns.lowering})"))


def _planning_arguments(q: argparse.ArgumentParser) -> None:
    """The arguments ``plan`` and ``inspect`` share: the workload, the budget and the options."""
    q.add_argument("factory", help="MODULE:FACTORY returning the model and its inputs (and optimizer)")
    q.add_argument("--budget", required=True,
                   help="bytes, or with a unit: 512MiB, 2GB, 1.5GiB; or a percentage of the "
                        "step's unoptimised peak (plan.unoptimized_peak): 60%%")
    q.add_argument("--allow", metavar="LEVERS", type=_levers, help="comma-separated levers the plan may use "
                   "(default: the exact ones, recompute,microbatch)")
    q.add_argument("--strategy", default="ilp", choices=["ilp", "greedy", "checkpoint-blocks",
                                                          "save-all"])
    q.add_argument("--lowering", default="inductor", choices=["eager", "inductor"],
                   help="how the plan's graphs run: Inductor's kernels (default) or FX code")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxmem", description="Fit a training step into a memory budget.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("estimate", help="predict (and measure) the peak memory of a training step")
    p.add_argument("factory", help="MODULE:FACTORY returning the model and its inputs (and optimizer)")
    p.add_argument("--no-measure", action="store_true", help="predict only; do not run the step")
    p.add_argument("--plot", metavar="PNG", help="write predicted vs measured memory to this PNG")
    p.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    q = sub.add_parser("plan", help="plan a training step under a budget, run it, measure it")
    _planning_arguments(q)
    q.add_argument("--plot", metavar="PNG", help="also run the unoptimised step and write its "
                   "memory and the plan's, predicted and measured, to this PNG")
    q.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    q.add_argument("--show-graphs", action="store_true", help="print the rewritten graphs")
    q.add_argument("--alternatives", action="store_true",
                   help="choose with the joint planner (fxmem.planning.joint): plan every "
                        "combination of the allowed levers' settings (microbatch count, fp32 or "
                        "bf16 compute, dense or sparse weights), run the fastest that fits "
                        "(exact before lossy) and print the best alternatives after the plan. "
                        "Without it, the levers are tried in fxmem.optimize's fixed order")
    q.add_argument("--top", metavar="N", type=int, default=8,
                   help="with --alternatives: how many rows the table shows (default 8)")
    q.add_argument("--pareto", metavar="PNG", help="write the joint planner's Pareto front "
                   "(predicted peak against predicted step time) to this PNG; implies "
                   "--alternatives")
    q.add_argument("--floors", action="store_true", help="with --alternatives: also search the "
                   "floor of every combination that fits (one more plan each, under a 1-byte "
                   "budget)")
    q.add_argument("--time-limit", type=float, default=3.0, metavar="S",
                   help="with --alternatives: the solver's time limit per solve (default 3 s)")
    q.add_argument("--search", default="all", choices=["all", "needed"],
                   help="with --alternatives: plan every combination (all, default), or the "
                        "lossy ones only when no exact one fits (needed: the same choice, "
                        "fewer alternatives)")
    q.add_argument("--prefer", choices=["exact", "time"], default=None,
                   help="how the joint planner chooses (implies --alternatives): exact, the "
                        "fastest exact combination that fits, lossy ones only when none does "
                        "(default); time, the fastest that fits, lossy or not (among those "
                        "within 1%% of it, the least lossy), so the chosen plan's predicted "
                        "time never rises as the budget grows")
    q.add_argument("--no-progress", action="store_true",
                   help="with --alternatives: no progress bar (by default a tqdm bar on "
                        "stderr counts the combinations planned)")
    r = sub.add_parser("inspect", help="write a plan's graphs, passes and memory to a folder")
    _planning_arguments(r)
    r.add_argument("--out", required=True, metavar="DIR", help="the folder to write to")
    r.add_argument("--no-measure", action="store_true",
                   help="plan only (no step run, no memory plot)")
    ns = parser.parse_args(argv)
    if ns.command == "plan" and ns.prefer == "time" and ns.search == "needed":
        parser.error("--search needed plans the lossy combinations only when no exact one "
                     "fits, so it needs --prefer exact")
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING)
    try:
        return {"plan": _plan, "inspect": _inspect, "estimate": _estimate}[ns.command](ns)
    except FxmemError as exc:
        print(f"fxmem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
