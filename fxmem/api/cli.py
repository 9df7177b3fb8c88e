"""The ``fxmem`` command line: ``fxmem estimate MODULE:FACTORY`` and ``fxmem plan ...``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

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


def _plan(ns: argparse.Namespace) -> int:
    import gc

    import fxmem

    from fxmem.budget import format_bytes
    from fxmem.api.workload import load_workload

    workload = load_workload(ns.factory)
    model = fxmem.optimize(workload.model, ns.budget, optimizer=workload.optimizer,
                           loss_fn=workload.loss_fn, strategy=ns.strategy, lowering=ns.lowering)

    def step():
        out = model(*workload.args, **workload.kwargs)
        fxmem.loss_from_output(out).backward()
        if workload.optimizer is not None:
            workload.optimizer.step()
            workload.optimizer.zero_grad(set_to_none=True)

    step()  # plans and compiles on the first call
    workload.zero_grad()
    gc.collect()
    measured = fxmem.measure_memory(step, device=next(workload.model.parameters()).device)
    plan = model.plan
    print(f"fxmem plan: {workload.name}, lowering {ns.lowering}")
    print(plan.report())
    print(f"measured peak {format_bytes(measured.peak)} "
          f"({'within' if measured.peak <= plan.budget else 'OVER'} the budget of "
          f"{format_bytes(plan.budget)})")
    if ns.show_graphs:
        for name in ("forward", "backward"):
            print(f"\n# {name} graph\n{plan.graphs[name].code}")
    return 0 if measured.peak <= plan.budget else 1


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
    q.add_argument("factory", help="MODULE:FACTORY returning the model and its inputs (and optimizer)")
    q.add_argument("--budget", required=True, help="bytes, or with a unit: 512MiB, 2GB, 1.5GiB")
    q.add_argument("--strategy", default="ilp", choices=["ilp", "greedy", "checkpoint-blocks",
                                                          "save-all"])
    q.add_argument("--lowering", default="eager", choices=["eager", "inductor"])
    q.add_argument("--show-graphs", action="store_true", help="print the rewritten graphs")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING)
    try:
        return _plan(ns) if ns.command == "plan" else _estimate(ns)
    except FxmemError as exc:
        print(f"fxmem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
