"""Saved values stored in 8 bits (``fxmem.optimize(..., stored_bits=8)``) on the bench workloads,
measured on the CPU, against bf16 storage (the precision lever's default) and fp32.

For each workload, in one process:

- **floors**: ``fxmem.floor`` with ``allow=("recompute", "precision")`` (Inductor lowering,
  planned, not run), with saved values stored in bf16 at most (``stored_bits=16``) and in 8
  bits too (``stored_bits=8``), and how much lower the second is;
- **measured**: at budgets ``--factors`` times the 8-bit floor, the plan with
  ``stored_bits=16`` and with ``stored_bits=8`` (``fxmem.optimize(model, budget, allow=...,
  stored_bits=...)``), each run once to compile, then one step measured with
  ``fxmem.measure_memory`` (measured peak against the budget and the prediction, what the plan
  stores in 8 bits and in bf16), ``--repeats`` steps timed (the median; the two plans' rows of
  one budget are run one after the other in the same process, so compare them as a ratio), the
  plan's predicted recompute time, and the step's gradients against eager fp32's from the same
  weights and inputs (relative L2 error, the largest over the parameters; dropout off: the
  bench workloads' dropout draws differ between eager and a bf16 plan).

Writes ``bench/results/<out>.{md,json}``.

    python bench/stored_8bit.py [--workloads gpt_decoder,hf_gpt2,wrn_28_2] [--reduced wrn_28_2]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from bench.precision import MiB, PRECISE, build, run_all, say, step  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout") and isinstance(getattr(m, "dropout"), float):
            m.dropout = 0.0


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def floors(w: dict, time_limit: float) -> dict:
    model, args, kwargs = w["model"], w["args"], w["kwargs"]
    out = {}
    for bits in (16, 8):
        t0 = time.perf_counter()
        out[f"floor_{bits}"] = fxmem.floor(model, *args, allow=PRECISE, time_limit=time_limit,
                                           stored_bits=bits, **kwargs)
        out[f"floor_{bits}_seconds"] = time.perf_counter() - t0
    out["floor_lower_pct"] = 100.0 * (1 - out["floor_8"] / out["floor_16"])
    return out


def measured(name: str, reduced: bool, budget: int, time_limit: float, bits: int,
             repeats: int) -> dict:
    w = build(name, reduced)
    model = w["model"]
    _no_dropout(model)
    eager = copy.deepcopy(model)
    step(eager, w)
    expected = _grads(eager)
    del eager
    module = fxmem.optimize(model, budget, allow=PRECISE, time_limit=time_limit,
                            stored_bits=bits)
    rec: dict = {"budget": budget, "stored_bits": bits}
    try:
        step(module, w)  # plans and compiles; its gradients are the step's
    except fxmem.BudgetError as exc:
        rec.update(error=str(exc).splitlines()[0], floor=exc.floor)
        return rec
    got = _grads(model)
    errors = {n: float((got[n] - e).norm() / e.norm().clamp_min(1e-12))
              for n, e in expected.items() if n in got}
    model.zero_grad(set_to_none=True)
    gc.collect()
    mem = fxmem.measure_memory(lambda: step(module, w), device="cpu",
                               baseline=[model, w["args"], w["kwargs"]])
    model.zero_grad(set_to_none=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(module, w)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    plan = module.plan
    stored = next((r.details for r in plan.provenance if r.name == "stored-low"), None)
    worst = max(errors, key=errors.get)
    rec.update(measured_peak=mem.peak, predicted_peak=plan.predicted_peak,
               within_budget=mem.peak <= budget,
               prediction_error_pct=100.0 * (plan.predicted_peak - mem.peak) / mem.peak,
               values_8bit=len(stored.values_8bit) if stored else 0,
               values_bf16=len(stored.values) if stored else 0,
               stored_low=next(r.summary for r in plan.provenance if r.name == "stored-low")
               if stored else None,
               step_seconds=sorted(times)[len(times) // 2],
               predicted_recompute_ms=1e3 * plan.solution.recompute_time,
               grad_rel_err_max=errors[worst], grad_rel_err_worst=worst,
               grad_rel_err_median=sorted(errors.values())[len(errors) // 2],
               grads_missing=sorted(set(expected) - set(got)))
    say(f"  stored_bits={bits} @ {budget / MiB:.2f} MiB: measured {mem.peak / MiB:.2f}, predicted "
        f"{plan.predicted_peak / MiB:.2f} ({rec['prediction_error_pct']:+.2f}%), within budget: "
        f"{rec['within_budget']}; {rec['values_8bit']} values in 8 bits, "
        f"{rec['values_bf16']} in bf16; step {rec['step_seconds']:.3f} s, predicted recompute "
        f"{rec['predicted_recompute_ms']:.1f} ms; gradients max rel err {errors[worst]:.4f}")
    return rec


def run_workload(name: str, ns) -> dict:
    reduced = name in ns.reduced
    say(f"=== {name}{' (reduced)' if reduced else ''}")
    w = build(name, reduced)
    result = {"workload": name, "sizes": w["sizes"], **floors(w, ns.time_limit)}
    del w
    say(f"  floor bf16 storage {result['floor_16'] / MiB:.2f} MiB, 8 bits "
        f"{result['floor_8'] / MiB:.2f} MiB ({result['floor_lower_pct']:.1f}% lower)")
    result["runs"] = [measured(name, reduced, int(f * result["floor_8"]), ns.time_limit, bits,
                               ns.repeats) for f in ns.factors for bits in (16, 8)]
    return result


def write(results: list[dict], env: dict, out: str) -> None:
    (RESULTS / f"{out}.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    md = ["# Saved values stored in 8 bits (`stored_bits=8`) against bf16 storage (CPU)", "",
          f"`python bench/stored_8bit.py {' '.join(env['argv'])}` on {env['cpu']}, "
          f"{env['threads']} threads, torch {env['torch']}, {env['date']}.", "",
          "Floors: `fxmem.floor(..., allow=(\"recompute\", \"precision\"))` (Inductor, planned, "
          "not run) with `stored_bits=16` (bf16 storage, the default) and `stored_bits=8`. "
          "Measured: one step of `fxmem.optimize(..., stored_bits=8)` through Inductor, its peak "
          "from the allocator; gradients against eager fp32 from the same weights and batch "
          "(dropout off), relative L2 error per parameter.", "",
          "| workload | floor, bf16 storage | floor, 8 bits too | lower by |",
          "|---|---|---|---|"]
    for r in results:
        if "error" in r:
            md.append(f"| {r['workload']} | failed: {r['error']} | | |")
            continue
        md.append(f"| {r['workload']} {r['sizes'] or ''} | {r['floor_16'] / MiB:.2f} MiB | "
                  f"{r['floor_8'] / MiB:.2f} MiB | {r['floor_lower_pct']:.1f}% |")
    md += ["", "| workload | budget MiB | stored_bits | measured MiB | predicted MiB | error | "
           "within | values in 8 bits / bf16 | step s (median) | predicted recompute ms | "
           "gradient rel. error: max (param), median |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for run in r.get("runs", []):
            if "error" in run:
                md.append(f"| {r['workload']} | {run['budget'] / MiB:.2f} | "
                          f"{run['stored_bits']} | {run['error']} | | | | | | | |")
                continue
            md.append(f"| {r['workload']} | {run['budget'] / MiB:.2f} | {run['stored_bits']} | "
                      f"{run['measured_peak'] / MiB:.2f} | {run['predicted_peak'] / MiB:.2f} | "
                      f"{run['prediction_error_pct']:+.2f}% | {run['within_budget']} | "
                      f"{run['values_8bit']} / {run['values_bf16']} | "
                      f"{run['step_seconds']:.3f} | {run['predicted_recompute_ms']:.1f} | "
                      f"{run['grad_rel_err_max']:.4f} ({run['grad_rel_err_worst']}), "
                      f"{run['grad_rel_err_median']:.4f} |")
    md.append("")
    (RESULTS / f"{out}.md").write_text("\n".join(md))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="gpt_decoder,hf_gpt2,wrn_28_2")
    parser.add_argument("--reduced", default="wrn_28_2")
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds per solve")
    parser.add_argument("--out", default="stored_8bit")
    parser.add_argument("--factors", default="1.0,1.02",
                        help="budgets, as multiples of the 8-bit floor")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per plan (median)")
    ns = parser.parse_args(argv)
    ns.reduced = [n for n in ns.reduced.split(",") if n]
    ns.factors = [float(f) for f in ns.factors.split(",")]
    unknown = set(ns.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    run_all(ns, run_workload, write, argv)
    return 0

if __name__ == "__main__":
    sys.exit(main())
