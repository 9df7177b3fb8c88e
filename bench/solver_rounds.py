"""How many solver rounds a plan takes, on the bench workloads' budget sweeps (CPU, no timing).

The planner solves the recompute problem with its linear memory model, realises the decision as
forward and backward graphs and simulates them with the exact memory model of the lowering; where
the two disagree it feeds the difference back and solves again. Each round is a solve, so the
number of rounds says how well the linear model agrees with the exact one.

For each workload this captures the joint graph once, as Inductor hands it to fxmem's partitioner
(``lowering="inductor"``, the bench's setting), then plans it at every budget of the last
``recompute_peers`` sweep (``bench/results/recompute_peers.json``: the peers' peaks, the spread
budgets, and 1 byte, which asks for the floor), counting the solver calls (``solve_ilp`` and
``min_peak``) each plan makes. It records the predicted peak and a digest of the saved set, so two
runs (before and after a change) show whether the plans are the same.

    python bench/solver_rounds.py --label after     # writes bench/results/solver_rounds_after.json
    python bench/solver_rounds.py --compare before,after   # the table: solver_rounds.md
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MiB = 2**20


def _module(*names):
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {names}")


class _Captured(Exception):
    pass


def capture_joint(factory):
    """The joint graph Inductor hands fxmem's partitioner, and its partition arguments."""
    import fxmem

    backend_mod = _module("fxmem.api.backend", "fxmem.backend")
    seen = {}

    def record(joint, **kwargs):
        seen["joint"] = copy.deepcopy(joint)
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "options"}
        raise _Captured()

    original = backend_mod.plan_joint
    backend_mod.plan_joint = record
    torch._dynamo.reset()
    try:
        w = factory()
        model = fxmem.optimize(w["model"], 2**40, lowering="inductor")
        try:
            model(*w["args"], **w["kwargs"])
        except Exception as exc:  # the partitioner's exception, wrapped by the compiler
            if "joint" not in seen:
                raise
            del exc
    finally:
        backend_mod.plan_joint = original
        torch._dynamo.reset()
    return seen["joint"], seen["kwargs"]


def plan_counting(joint, kwargs, budget: int) -> dict:
    """Plan ``joint`` at ``budget``; the solver calls it made, its predicted peak and saved set."""
    import fxmem

    planner = _module("fxmem.planning.planner", "fxmem.planner")
    counts = {"solve_ilp": 0, "min_peak": 0}
    originals = {}
    for name in counts:
        holder = next((m for m in _solver_holders(planner) if hasattr(m, name)), None)
        if holder is None:
            continue
        originals[(holder, name)] = getattr(holder, name)

        def counted(*a, _f=getattr(holder, name), _n=name, **k):
            counts[_n] += 1
            return _f(*a, **k)

        setattr(holder, name, counted)
    t0 = time.perf_counter()
    row = {"budget": budget}
    try:
        options = planner.PlanOptions(budget=budget, lowering="inductor", safety_margin=0.01)
        plan = planner.plan_joint(copy.deepcopy(joint), options=options, **kwargs)
        saved = sorted(n for n in plan.solution_saved_names()) \
            if hasattr(plan, "solution_saved_names") else _saved_names(plan)
        row.update(ok=True, predicted_peak=int(plan.predicted_peak),
                   unoptimized_peak=int(plan.unoptimized_peak),
                   recompute_seconds=float(plan.solution.recompute_time),
                   saved_digest=hashlib.sha256("\n".join(saved).encode()).hexdigest()[:12],
                   saved=len(saved))
    except fxmem.BudgetError as exc:
        row.update(ok=False, floor=int(exc.floor))
    finally:
        for (holder, name), f in originals.items():
            setattr(holder, name, f)
    row.update(counts, solves=sum(counts.values()), seconds=round(time.perf_counter() - t0, 2))
    return row


def _solver_holders(planner):
    """Modules whose global names the planner calls the solvers by."""
    holders = [planner]
    for name in ("fxmem.levers.recompute.lever", "fxmem.levers.recompute.solve"):
        try:
            holders.append(importlib.import_module(name))
        except ImportError:
            pass
    return holders


def _saved_names(plan) -> list[str]:
    forward = plan.graphs["forward"]
    out = next(n for n in forward.graph.nodes if n.op == "output").args[0]
    return sorted(str(n) for n in out if isinstance(n, torch.fx.Node))


def sweep_budgets() -> dict[str, list[int]]:
    data = json.loads((RESULTS / "recompute_peers.json").read_text())
    budgets = {}
    for w in data["workloads"]:
        bs = sorted({int(r["budget"]) for r in w["fxmem"]}, reverse=True)
        budgets[w["workload"]] = bs + [1]
    return budgets


def run(label: str, names: list[str]) -> Path:
    sys.path.insert(0, str(ROOT))
    from bench.workloads import WORKLOADS

    torch.manual_seed(0)
    out = {"label": label, "torch": torch.__version__, "workloads": {}}
    for name, budgets in sweep_budgets().items():
        if names and name not in names:
            continue
        print(f"[{label}] {name}: capturing", flush=True)
        joint, kwargs = capture_joint(WORKLOADS[name])
        rows = []
        for b in budgets:
            row = plan_counting(joint, kwargs, b)
            print(f"[{label}] {name} @ {b / MiB:.1f} MiB: {row}", flush=True)
            rows.append(row)
        out["workloads"][name] = rows
    path = RESULTS / f"solver_rounds_{label}.json"
    path.write_text(json.dumps(out, indent=1))
    return path


def compare(labels: list[str]) -> Path:
    runs = [json.loads((RESULTS / f"solver_rounds_{lb}.json").read_text()) for lb in labels]
    lines = ["# Solver rounds per plan, before and after", "",
             "`python bench/solver_rounds.py --label L` per version, then "
             f"`--compare {','.join(labels)}`. Each plan at a budget of the recompute_peers sweep "
             "(Inductor lowering, 1% margin, 30 s ILP limit); solves = ILP solves + min_peak solves "
             "(the floor search). Same plan = same saved set (digest).", ""]
    totals = {lb: 0 for lb in labels}
    floor_totals = {lb: 0 for lb in labels}
    for name in runs[0]["workloads"]:
        lines += [f"## {name}", "",
                  "| budget (MiB) | " + " | ".join(f"{lb}: solves / predicted MiB" for lb in labels)
                  + " | same plan |", "|---|" + "---|" * (len(labels) + 1)]
        rows = [{r["budget"]: r for r in run["workloads"].get(name, [])} for run in runs]
        for budget in rows[0]:
            cells, digests = [], set()
            for lb, table in zip(labels, rows):
                r = table.get(budget)
                if r is None:
                    cells.append("-")
                    continue
                (floor_totals if budget == 1 else totals)[lb] += r["solves"]
                peak = r.get("predicted_peak") or r.get("floor")
                tag = "" if r["ok"] else " (floor)"
                cells.append(f"{r['solves']} / {peak / MiB:.1f}{tag}")
                digests.add(r.get("saved_digest") or f"floor {r.get('floor')}")
            shown = "1 B" if budget == 1 else f"{budget / MiB:.1f}"
            lines.append(f"| {shown} | " + " | ".join(cells)
                         + f" | {'yes' if len(digests) == 1 else 'no'} |")
        lines.append("")
    lines.append("Solves planning the budgets that fit (the fitting rounds): "
                 + ", ".join(f"{lb} {totals[lb]}" for lb in labels) + ".")
    lines.append("")
    lines.append("Solves of the floor search (the 1-byte budget, which raises BudgetError): "
                 + ", ".join(f"{lb} {floor_totals[lb]}" for lb in labels) + ".")
    path = RESULTS / "solver_rounds.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="after")
    parser.add_argument("--workloads", default="")
    parser.add_argument("--compare", default="")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(args.compare.split(",")).read_text())
        return 0
    print(run(args.label, [n for n in args.workloads.split(",") if n]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
