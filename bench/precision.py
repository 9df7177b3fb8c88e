"""The precision lever (bf16 compute casts, saved values stored in bf16) on the bench workloads,
measured on the CPU.

For each workload, in one process:

- **floors**: the smallest budget fxmem meets with recomputation alone
  (``allow=("recompute",)``) and with the precision lever allowed too
  (``allow=("recompute", "precision")``), both ``fxmem.floor`` with Inductor lowering (planned,
  not run), and how much lower the second is;
- **measured peaks**: ``fxmem.optimize(model, budget, lowering="inductor")`` with each lever set
  at budgets in its own range -- recompute alone at 1.03x its floor and half way from its floor to
  the unoptimised peak; with precision at 1.03x its floor and half way from there to recompute
  alone's floor (budgets recompute alone cannot meet; above them, exact levers come first and
  the plan is recompute alone's) -- each run once to compile, then one step measured with
  ``fxmem.measure_memory`` (the bytes the model and inputs hold at the start plus the
  allocator's events);
- **speed**: the step in bf16 against fp32 through Inductor: ``torch.compile(model)`` and
  ``torch.compile`` of the model's forward under ``torch.autocast("cpu", torch.bfloat16)`` (the
  casts fxmem's precision lever makes), timed in alternating steps in the same run: the ratio
  of the medians. (fxmem's own bf16 plans are not timed against fp32 here: with nothing
  recomputed, autocast's joint graph saves the bf16 weight copies beside the fp32 weights, so a
  bf16 step without recomputation can need more than the fp32 one, and fxmem only plans bf16
  under budgets its exact plans cannot meet.)

The workloads named by ``--reduced`` (default: ``wrn_28_2``, as WRN-16-2 at batch 64: what 2
shared CPU cores measure in minutes) are built at the smaller sizes of :data:`SIZES`; the others
at bench/workloads.py's defaults.

Writes ``bench/results/<out>.{md,json}``.

    python bench/precision.py [--workloads gpt_decoder,hf_gpt2,wrn_28_2] [--reduced wrn_28_2]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from bench.environment import cpu_name  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MiB = 2**20
EXACT, PRECISE = ("recompute",), ("recompute", "precision")
SIZES = {  # --reduced: the bench architectures, smaller
    "gpt_decoder": dict(batch=4),
    "hf_gpt2": dict(batch=4),
    "wrn_28_2": dict(batch=64, depth=16),
}
_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def build(name: str, reduced: bool) -> dict:
    torch._dynamo.reset()
    gc.collect()
    kwargs = SIZES[name] if reduced else {}
    w = WORKLOADS[name](**kwargs)
    w["sizes"] = kwargs
    return w


def step(fn, w: dict) -> None:
    """forward + loss + backward, the output held until the backward ends."""
    out = fn(*w["args"], **w["kwargs"])
    fxmem.loss_from_output(out).backward()
    del out


def floors(w: dict, time_limit: float) -> dict:
    """fxmem.floor with recompute alone and with precision, and the unoptimised peaks."""
    model, args, kwargs = w["model"], w["args"], w["kwargs"]
    t0 = time.perf_counter()
    try:
        fxmem.optimize(model, 1, allow=EXACT, time_limit=time_limit).plan_for(*args, **kwargs)
        raise AssertionError("a 1-byte budget was met")
    except fxmem.BudgetError as exc:
        exact, unopt = int(exc.floor), int(exc.unoptimized)
    t1 = time.perf_counter()
    low = fxmem.floor(model, *args, allow=PRECISE, time_limit=time_limit, **kwargs)
    t2 = time.perf_counter()
    return {"floor_recompute": exact, "floor_precision": int(low),
            "floor_lower_pct": 100.0 * (1 - low / exact), "unoptimized_fp32": unopt,
            "floor_seconds": {"recompute": t1 - t0, "precision": t2 - t1}}


def budgets(f: dict) -> list[tuple[tuple[str, ...], int]]:
    """(allow, budget) pairs: each lever set at budgets in its own range."""
    exact, low, top = f["floor_recompute"], f["floor_precision"], f["unoptimized_fp32"]
    out = [(EXACT, int(1.03 * exact)), (EXACT, (exact + top) // 2)]
    for b in (int(1.03 * low), (int(1.03 * low) + exact) // 2):
        if b < exact and all(b != x for _, x in out):
            out.append((PRECISE, b))
    return out


def measured_run(name: str, reduced: bool, allow, budget: int, time_limit: float,
                 precision: str | None = None) -> dict:
    """One plan compiled and run, then one step measured."""
    w = build(name, reduced)
    model = w["model"]
    module = fxmem.optimize(model, budget, allow=allow, time_limit=time_limit,
                            precision=precision)
    rec = {"allow": list(allow), "budget": budget}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        step(module, w)
    except fxmem.BudgetError as exc:
        rec.update(error=str(exc).splitlines()[0], floor=exc.floor)
        return rec
    rec["first_call_seconds"] = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    step(module, w)  # one unprofiled step, timed (alone: compare across rows with care)
    rec["step_seconds"] = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    gc.collect()
    mem = fxmem.measure_memory(lambda: step(module, w), device="cpu",
                               baseline=[model, w["args"], w["kwargs"]])
    model.zero_grad(set_to_none=True)
    plan = module.plan
    record = next((r for r in plan.provenance if r.name == "precision"), None)
    rec.update(measured_peak=mem.peak, predicted_peak=plan.predicted_peak,
               within_budget=mem.peak <= budget,
               prediction_error_pct=100.0 * (plan.predicted_peak - mem.peak) / mem.peak,
               precision_used=record is not None,
               recomputed_ops=len(plan.record.recomputed),
               casts=record.summary if record is not None else None,
               stored_low=next((r.summary for r in plan.provenance if r.name == "stored-low"),
                               None))
    say(f"  {'+'.join(allow)} @ {budget / MiB:.2f} MiB: measured {mem.peak / MiB:.2f}, predicted "
        f"{plan.predicted_peak / MiB:.2f} ({rec['prediction_error_pct']:+.2f}%), "
        f"{'bf16' if record else 'fp32'}, within budget: {rec['within_budget']}")
    return rec


def paired_speed(name: str, reduced: bool, f: dict, time_limit: float, repeats: int) -> list:
    """At budgets both meet, the exact plan (recompute alone) against the bf16 plan
    (``precision="bf16"``), each compiled, then timed in alternating steps: the ratio of the
    medians. With precision merely allowed, fxmem plans the exact levers wherever they fit (the
    lossy lever only where the budget needs it), so its speed there is the exact plan's."""
    top, low = f["unoptimized_fp32"], max(f["floor_recompute"], f["floor_precision"])
    out = []
    for budget in (int(1.05 * low), (low + top) // 2):
        w = build(name, reduced)
        model = w["model"]
        mods = {"exact": fxmem.optimize(model, budget, allow=EXACT, time_limit=time_limit),
                "bf16": fxmem.optimize(model, budget, allow=PRECISE, precision="bf16",
                                       time_limit=time_limit)}
        rec = {"budget": budget, "seconds": {k: [] for k in mods}}
        try:
            for mod in mods.values():
                for _ in range(2):  # compile, then warm up
                    model.zero_grad(set_to_none=True)
                    torch.manual_seed(0)
                    step(mod, w)
        except fxmem.BudgetError as exc:
            rec["error"] = str(exc).splitlines()[0]
            out.append(rec)
            continue
        for i in range(repeats):
            for label in (("exact", "bf16") if i % 2 == 0 else ("bf16", "exact")):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                step(mods[label], w)
                rec["seconds"][label].append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        med = {k: statistics.median(v) for k, v in rec["seconds"].items()}
        rec.update(median_seconds=med, bf16_over_exact=med["bf16"] / med["exact"],
                   predicted={k: m.plan.predicted_peak for k, m in mods.items()})
        say(f"  @ {budget / MiB:.2f} MiB: exact {1e3 * med['exact']:.0f} ms, bf16 "
            f"{1e3 * med['bf16']:.0f} ms: ratio {rec['bf16_over_exact']:.2f}")
        out.append(rec)
        del mods, w, model
        gc.collect()
    return out


def _autocast(model):
    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(*args, **kwargs)
    return forward


def speed(name: str, reduced: bool, repeats: int) -> dict:
    """The step in fp32 and in bf16 (autocast) through Inductor, timed alternately."""
    w = build(name, reduced)
    model = w["model"]
    fns = {"fp32": torch.compile(model), "bf16": torch.compile(_autocast(model))}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for fn in fns.values():  # compile, then one warm-up step
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            step(fn, w)
    for i in range(repeats):
        for label in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(fns[label], w)
            times[label].append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    say(f"  step fp32 {1e3 * med['fp32']:.0f} ms, bf16 {1e3 * med['bf16']:.0f} ms: "
        f"ratio {med['bf16'] / med['fp32']:.2f}")
    return {"step_seconds": times, "median_seconds": med,
            "bf16_over_fp32": med["bf16"] / med["fp32"]}


def run_workload(name: str, ns) -> dict:
    say(f"=== {name}" + (" (reduced)" if name in ns.reduced else ""))
    w = build(name, name in ns.reduced)
    result = {"workload": name, "sizes": w["sizes"],
              "parameters": sum(p.numel() for p in w["model"].parameters())}
    result.update(floors(w, ns.time_limit))
    del w
    say(f"  floor recompute {result['floor_recompute'] / MiB:.2f} MiB, with precision "
        f"{result['floor_precision'] / MiB:.2f} MiB ({result['floor_lower_pct']:.1f}% lower); "
        f"unoptimised {result['unoptimized_fp32'] / MiB:.2f}")
    result["runs"] = [measured_run(name, name in ns.reduced, allow, b, ns.time_limit)
                      for allow, b in budgets(result)]
    result["speed"] = speed(name, name in ns.reduced, ns.repeats)
    result["paired"] = paired_speed(name, name in ns.reduced, result, ns.time_limit,
                                    ns.repeats)
    return result


def _mib(x) -> str:
    return "" if x is None else f"{x / MiB:.2f}"


def workload_md(r: dict) -> list[str]:
    if "error" in r:
        return [f"## {r['workload']}", "", f"error: {r['error']}", ""]
    sizes = ", ".join(f"{k}={v}" for k, v in r["sizes"].items()) or "bench defaults"
    lines = [f"## {r['workload']} ({sizes}; {r['parameters'] / 1e6:.2f}M parameters)", "",
             "| | recompute alone | with precision |", "|---|---|---|",
             f"| floor MiB | {_mib(r['floor_recompute'])} | {_mib(r['floor_precision'])} "
             f"({r['floor_lower_pct']:.1f}% lower) |",
             f"| unoptimised peak MiB (predicted, fp32) | {_mib(r['unoptimized_fp32'])} | |", "",
             "| levers | budget MiB | measured peak MiB | predicted MiB | error | within budget "
             "| compute | recomputed ops | step s |", "|---|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        if "error" in run:
            lines.append(f"| {'+'.join(run['allow'])} | {_mib(run['budget'])} | failed: "
                         f"{run['error']} | | | | | | |")
            continue
        lines.append(
            f"| {'+'.join(run['allow'])} | {_mib(run['budget'])} | {_mib(run['measured_peak'])} "
            f"| {_mib(run['predicted_peak'])} | {run['prediction_error_pct']:+.2f}% | "
            f"{'yes' if run['within_budget'] else 'NO'} | "
            f"{'bf16' if run['precision_used'] else 'fp32'} | {run['recomputed_ops']} | "
            f"{run['step_seconds']:.2f} |")
    s = r["speed"]
    lines += ["", f"Step time through Inductor (`torch.compile`, fp32 and under bf16 autocast), "
              f"{len(s['step_seconds']['fp32'])} alternating steps each: fp32 "
              f"{1e3 * s['median_seconds']['fp32']:.0f} ms, bf16 "
              f"{1e3 * s['median_seconds']['bf16']:.0f} ms (medians): **bf16 / fp32 = "
              f"{s['bf16_over_fp32']:.2f}**.", ""]
    paired = r.get("paired") or []
    if paired:
        lines += ["Plans at the same budget, timed in alternating steps (medians): the exact plan "
                  "(recompute alone) against the bf16 plan (`precision=\"bf16\"`). With "
                  "precision merely allowed, fxmem plans the exact levers wherever they fit, so "
                  "its step there is the exact plan's; forcing bf16 buys the ratio below.", "",
                  "| budget MiB | exact ms | bf16 ms | bf16 / exact |", "|---|---|---|---|"]
        for p in paired:
            if "error" in p:
                lines.append(f"| {_mib(p['budget'])} | failed: {p['error']} | | |")
                continue
            m = p["median_seconds"]
            lines.append(f"| {_mib(p['budget'])} | {1e3 * m['exact']:.0f} | "
                         f"{1e3 * m['bf16']:.0f} | {p['bf16_over_exact']:.2f} |")
        lines.append("")
    casts = [run["casts"] for run in r["runs"] if run.get("casts")]
    if casts:
        lines += [f"Casts at the lowest budget: {casts[0]}", ""]
    stored = [run["stored_low"] for run in r["runs"] if run.get("stored_low")]
    if stored:
        lines += [f"Stored low at the lowest budget: {stored[0]}", ""]
    return lines


def write(results: list[dict], env: dict, out: str) -> None:
    (RESULTS / f"{out}.json").write_text(json.dumps({"env": env, "workloads": results},
                                                    indent=2, default=str))
    md = ["# The precision lever: bf16 compute casts and saved values stored in bf16 (CPU)", "",
          f"{env['date']}, torch {env['torch']}, {env['cpu']} ({env['threads']} threads), "
          f"Inductor lowering; the machine's 2 cores are shared with other jobs, so step times "
          "are compared only as a ratio measured in the same run.", "",
          "Floors: `fxmem.floor` (planned, not run) with `allow=(\"recompute\",)` and with "
          "`allow=(\"recompute\", \"precision\")`. Measured: one step after the compiling call, "
          "`fxmem.measure_memory` (bytes the model and inputs hold at the start plus the "
          "allocator's events). With precision allowed the exact levers are tried first, so "
          "precision is measured at budgets recompute alone cannot meet. `step s`: one more "
          "step, timed alone (the machine is shared: compare across rows with care).", ""]
    for r in results:
        md += workload_md(r)
    if "total_seconds" in env:
        md += [f"Total run time {env['total_seconds']:.0f} s. Reproduce: "
               f"`python bench/precision.py {' '.join(env['argv'])}`".rstrip(), ""]
    (RESULTS / f"{out}.md").write_text("\n".join(md))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="gpt_decoder,hf_gpt2,wrn_28_2")
    parser.add_argument("--reduced", default="wrn_28_2",
                        help="workloads built at the smaller sizes of SIZES (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each, alternating")
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds per solve")
    parser.add_argument("--out", default="precision", help="results file stem")
    ns = parser.parse_args(argv)
    ns.reduced = [n for n in ns.reduced.split(",") if n]
    unknown = (set(ns.workloads.split(",")) | set(ns.reduced)) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    run_all(ns, run_workload, write, argv)
    return 0


def run_all(ns, run_workload, write, argv=None) -> None:
    """Each of ``ns.workloads`` (comma-separated) through ``run_workload(name, ns)``, one
    workload's failure reported, not fatal; ``write(results, env, ns.out)`` after each and at
    the end (with the total time). Inductor's caches are off: every plan compiles afresh."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch._functorch.config.enable_autograd_cache = False
    torch._inductor.config.fx_graph_cache = False
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "torch": torch.__version__, "cpu": cpu_name(), "threads": torch.get_num_threads(),
           "python": platform.python_version(),
           "argv": sys.argv[1:] if argv is None else list(argv)}
    results = []
    for name in ns.workloads.split(","):
        try:
            results.append(run_workload(name, ns))
        except Exception as exc:  # noqa: BLE001 - one workload's failure is reported, not fatal
            say(f"=== {name}: FAILED {type(exc).__name__}: {exc}")
            results.append({"workload": name, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=10)})
        write(results, env, ns.out)
    env["total_seconds"] = time.perf_counter() - _T0
    write(results, env, ns.out)
    say(f"done in {env['total_seconds']:.0f}s")

if __name__ == "__main__":
    sys.exit(main())
