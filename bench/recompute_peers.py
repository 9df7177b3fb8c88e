"""fxmem against the usual ways to trade time for memory, on the bench workloads (CPU).

For each workload, in one process, this measures the peak memory and the step time of:

- ``eager``: the model as it is;
- ``checkpoint``: ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` around every
  block (GPT: ``model.blocks``; WRN: every ``BasicBlock``; Hugging Face:
  ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``);
- ``compile``: ``torch.compile(model)`` (Inductor, default partitioner);
- ``compile amb=b``: ``torch.compile(model)`` compiled under
  ``torch._functorch.config.patch(activation_memory_budget=b)`` for b in 1.0, 0.5, 0.2, 0.05;

and ``fxmem @ X``: ``fxmem.optimize(model, P, lowering="inductor")`` at each peer X's measured
peak P, built while X is still alive, the two then timed interleaved; and fxmem alone at budgets
spread from its floor to its unoptimised peak.

A step is forward + loss + backward with the gradients set to None before it. Peak: one step
measured with ``fxmem.measure_memory`` after the first (compiling) call and the warm-up steps,
counting the bytes that the model (parameters, buffers) and the inputs hold at the start plus the
allocator's events during the step. Time (``time.perf_counter``): a peer X and ``fxmem @ X`` run
``--repeats`` timed steps each (more when steps are fast: at least ``--min-timed-seconds`` of
timed steps per side) in alternating blocks of two (X's block, fxmem's, then fxmem's,
X's, ...), each block after one untimed step (switching configuration changes what the CPU
allocator holds, and that transition is charged to neither), so that both see the same machine
load; the verdict "fxmem no slower than X" is the median of fxmem's step time over X's, the i-th
timed step of each paired, <= 1. The ratio
of the medians and of the fastest steps are reported too. A peer at whose peak fxmem fails, and
the spread budgets, are timed alone (``--repeats`` steps). Every configuration re-creates the
model from the workload's factory (seed 0); TorchDynamo is reset and garbage collected before
each peer and after each pair or fxmem run (not between a peer and its ``fxmem @``).

Writes ``bench/results/recompute_peers.{md,json}`` and ``recompute_peers_<workload>.png``.

    python bench/recompute_peers.py [--workloads gpt_decoder,wrn_28_2,hf_gpt2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from bench.environment import cpu_name  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402
from fxmem.memory.measure import live_tensor_bytes  # noqa: E402
from fxmem.examples.wide_resnet import BasicBlock  # noqa: E402
from fxmem.api.optimize import optimize  # noqa: E402
from fxmem.planning.options import default_margin  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MiB = 2**20
AMB_DEFAULT = "1.0,0.5,0.2,0.05"
# fxmem.optimize's default margin here (Inductor on the CPU): it plans for this fraction under the
# budget
SAFETY_MARGIN = default_margin("inductor", "cpu")

_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# steps: build, measure, time


def fresh(factory: Callable[[], dict], *, reset: bool = True) -> dict:
    if reset:
        torch._dynamo.reset()
    gc.collect()
    w = factory()
    w["model"].zero_grad(set_to_none=True)
    return w


class Stepper:
    """One configuration's step: forward + loss + backward of ``fn`` on the workload's inputs."""

    def __init__(self, fn: Callable, w: dict):
        self.fn, self.model, self.args, self.kwargs = fn, w["model"], w["args"], w["kwargs"]

    def zero(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def step(self) -> None:
        out = self.fn(*self.args, **self.kwargs)
        fxmem.loss_from_output(out).backward()
        del out

    def timed(self) -> float:
        """Gradients set to None (untimed), then one step; returns its seconds."""
        self.zero()
        t0 = time.perf_counter()
        self.step()
        return time.perf_counter() - t0


def prepare(st: Stepper, *, warmup: int,
            first_context: Callable[[], Any] = contextlib.nullcontext) -> dict:
    """First call (under ``first_context``: compiles), warm-up steps, one memory-measured step."""
    st.zero()
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with first_context():
        st.step()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        st.zero()
        st.step()
    st.zero()
    gc.collect()
    start_all = live_tensor_bytes("cpu")
    mem = fxmem.measure_memory(st.step, device="cpu", baseline=[st.model, st.args, st.kwargs])
    st.zero()
    return {
        "measured_peak": mem.peak,
        "measured_start": mem.start,
        "stray_bytes_at_start": start_all - mem.start,
        "first_call_seconds": first,
        "loadavg_1min": [load_before],  # the load after the timed steps is appended
    }


def step_stats(times: list[float], timed: str) -> dict:
    return {"timed": timed, "step_seconds": times, "median_step_seconds": statistics.median(times),
            "min_step_seconds": min(times)}


def time_alone(st: Stepper, repeats: int) -> dict:
    times = [st.timed() for _ in range(repeats)]
    st.zero()
    return step_stats(times, "alone")


def time_interleaved(a: Stepper, b: Stepper, repeats: int, block: int = 2
                     ) -> tuple[list[float], list[float]]:
    """``repeats`` timed steps of each, in alternating blocks (a's block, b's, then b's, a's, ...)
    so that a drift in the machine's speed falls on both alike. Each block starts with one
    untimed step: switching configuration changes what the allocator holds (pages returned and
    faulted in again), and that transition should not be charged to either side."""
    ta: list[float] = []
    tb: list[float] = []
    rounds = -(-repeats // block)
    for i in range(rounds):
        n = min(block, repeats - i * block)
        for st, times in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            st.timed()
            times.extend(st.timed() for _ in range(n))
    a.zero()
    b.zero()
    return ta, tb


def failure(exc: BaseException) -> dict:
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=10)}


def say_failed(name: str, label: str, exc: BaseException) -> None:
    say(f"{name} {label}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


# ---------------------------------------------------------------------------------------------
# peers


def checkpoint_blocks(blocks) -> int:
    """Wrap each block's forward in non-reentrant activation checkpointing; returns the count."""
    n = 0
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        n += 1
    return n


def enable_checkpointing(name: str, model: torch.nn.Module) -> str:
    if name == "hf_gpt2":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "HF gradient_checkpointing_enable(use_reentrant=False), every GPT2Block"
    if name == "wrn_28_2":
        n = checkpoint_blocks([m for m in model.modules() if isinstance(m, BasicBlock)])
        return f"checkpoint() around each of {n} BasicBlocks"
    if hasattr(model, "blocks"):
        n = checkpoint_blocks(model.blocks)
        return f"checkpoint() around each of {n} model.blocks"
    raise ValueError(f"do not know the blocks of workload {name!r}")


def build_peer(name: str, label: str, model: torch.nn.Module, rec: dict):
    """The peer's callable and the context of its first (compiling) call; notes go into ``rec``."""
    if label == "eager":
        return model, contextlib.nullcontext
    if label == "checkpoint":
        rec["detail"] = enable_checkpointing(name, model)
        return model, contextlib.nullcontext
    if label == "compile":
        return torch.compile(model), contextlib.nullcontext
    if label.startswith("compile amb="):
        b = float(label.split("=", 1)[1])
        rec["activation_memory_budget"] = b
        return torch.compile(model), lambda: torch._functorch.config.patch(
            activation_memory_budget=b)
    raise ValueError(label)


def repeats_for(st: Stepper, ns) -> int:
    """``ns.repeats``, or more for a fast step: enough that the timed steps of one configuration
    take ``ns.min_timed_seconds`` (estimated from one untimed step), rounded up to whole blocks."""
    step = st.timed()
    st.zero()
    n = max(ns.repeats, math.ceil(ns.min_timed_seconds / max(step, 1e-3)))
    return n + n % 2


def run_pair(name: str, factory, label: str, ns) -> tuple[dict, dict | None]:
    """Peer ``label``, then ``fxmem @ label`` at its measured peak built while the peer lives; both
    timed in ``ns.repeats`` interleaved rounds (the peer alone if fxmem fails at that budget).
    Returns the peer's record and fxmem's (None if the peer failed before fxmem was built)."""
    peer: dict[str, Any] = {"config": label, "kind": "peer"}
    fx = None
    t0 = time.perf_counter()
    try:
        w = fresh(factory)
        fn, context = build_peer(name, label, w["model"], peer)
        p_st = Stepper(fn, w)
        peer.update(prepare(p_st, warmup=ns.warmup, first_context=context))
        # no TorchDynamo reset here: fxmem compiles its own code object, the peer's stays compiled
        fx, f_st = start_fxmem(name, factory, peer["measured_peak"], f"fxmem @ {label}", ns,
                               target=label, reset=False)
        if fx["ok"]:  # the live peer's model and inputs are not fxmem's strays
            fx["stray_bytes_at_start"] -= peer["measured_start"]
        if f_st is None:
            peer.update(time_alone(p_st, ns.repeats))
        else:
            tp, tf = time_interleaved(p_st, f_st, repeats_for(p_st, ns))
            peer.update(step_stats(tp, f"interleaved with {fx['config']}"))
            fx.update(step_stats(tf, f"interleaved with {label}"))
            fx["loadavg_1min"].append(os.getloadavg()[0])
        peer["loadavg_1min"].append(os.getloadavg()[0])
        peer["ok"] = True
        compare(peer, fx)
        say(f"{name} {label}: peak {peer['measured_peak'] / MiB:.1f} MiB, median step "
            f"{1e3 * peer['median_step_seconds']:.0f} ms, first call "
            f"{peer['first_call_seconds']:.1f}s, timed {peer['timed']}")
        if fx["ok"]:
            say_fxmem(name, fx)
    except Exception as exc:  # noqa: BLE001 - one failing configuration must not stop the run
        peer.update(failure(exc))
        if fx is not None and fx["ok"]:  # failed while the two were timed together
            fx.update(failure(exc))
        say_failed(name, label, exc)
    finally:
        w = fn = p_st = f_st = None  # noqa: F841
        torch._dynamo.reset()
        gc.collect()
    peer["wall_seconds"] = time.perf_counter() - t0  # the whole pair, fxmem's build included
    return peer, fx


def compare(peer: dict, fx: dict) -> None:
    """fxmem's step time over the peer's, on both records: per round (the verdict: the median of
    these <= 1), and the ratios of the medians and of the fastest steps."""
    if not fx["ok"]:
        peer["fxmem_error"] = fx["error"].splitlines()[0][:300]
        return
    ratios = [f / p for f, p in zip(fx["step_seconds"], peer["step_seconds"])]
    paired = {"paired_ratios": ratios, "paired_ratio_median": statistics.median(ratios)}
    peer.update(paired, fxmem_within_budget=fx["within_budget"],
                fxmem_time_ratio=fx["median_step_seconds"] / peer["median_step_seconds"],
                fxmem_time_ratio_min=fx["min_step_seconds"] / peer["min_step_seconds"],
                fxmem_no_slower=paired["paired_ratio_median"] <= 1.0)
    fx.update(paired, time_ratio_vs_target=peer["fxmem_time_ratio"],
              time_ratio_vs_target_min=peer["fxmem_time_ratio_min"])


# ---------------------------------------------------------------------------------------------
# fxmem


def start_fxmem(name: str, factory, budget: int, label: str, ns, target: str | None = None,
                reset: bool = True) -> tuple[dict, Stepper | None]:
    """``optimize`` a fresh model at ``budget``, then its first call, warm-up and measured step.
    Returns the record and the stepper to time (None if it failed)."""
    rec: dict[str, Any] = {"config": label, "kind": "fxmem", "budget": int(budget), "target": target}
    t0 = time.perf_counter()
    st = None
    try:
        w = fresh(factory, reset=reset)
        om = optimize(w["model"], int(budget), lowering="inductor")
        st = Stepper(om, w)
        rec.update(prepare(st, warmup=ns.warmup))
        rec.update(plan_fields(om.plan), ok=True, within_budget=rec["measured_peak"] <= budget)
    except fxmem.BudgetError as exc:
        st = None
        rec.update(ok=False, error=f"BudgetError: {exc}", floor=exc.floor)
        say(f"{name} {label}: budget {budget / MiB:.1f} MiB infeasible "
            f"(floor {(exc.floor or 0) / MiB:.1f} MiB)")
    except Exception as exc:  # noqa: BLE001
        st = None
        rec.update(failure(exc))
        say_failed(name, label, exc)
    finally:
        w = om = None  # noqa: F841 - st keeps them while it is timed
    rec["wall_seconds"] = time.perf_counter() - t0
    return rec, st


def plan_fields(plan) -> dict:
    sol = plan.solution
    return {
        "predicted_peak": plan.predicted_peak,
        "unoptimized_peak": plan.unoptimized_peak,
        "solve_seconds": sol.solve_seconds,
        "plan_seconds": plan.plan_seconds,
        "gap": sol.gap,
        "status": sol.status,
        "candidates": plan.candidates,
        "predicted_recompute_seconds": sol.recompute_time,
        "recomputed_ops": len(plan.record.recomputed),
        "record": plan.record.summary(),
    }


def say_fxmem(name: str, rec: dict) -> None:
    gap = "n/a" if rec["gap"] is None else f"{100 * rec['gap']:.2f}%"
    paired = ("" if "paired_ratio_median" not in rec
              else f" (paired ratio {rec['paired_ratio_median']:.2f})")
    say(f"{name} {rec['config']}: budget {rec['budget'] / MiB:.1f} MiB, predicted "
        f"{rec['predicted_peak'] / MiB:.1f}, measured {rec['measured_peak'] / MiB:.1f} MiB "
        f"({'within' if rec['within_budget'] else 'OVER'}), median step "
        f"{1e3 * rec['median_step_seconds']:.0f} ms{paired}, {rec['status']} solve "
        f"{rec['solve_seconds']:.2f}s gap {gap}, first call {rec['first_call_seconds']:.1f}s")


def run_fxmem(name: str, factory, budget: int, label: str, ns) -> dict:
    """fxmem alone at ``budget`` (no peer): built, measured and timed by itself."""
    t0 = time.perf_counter()
    rec, st = start_fxmem(name, factory, budget, label, ns)
    try:
        if st is not None:
            rec.update(time_alone(st, ns.repeats))
            rec["loadavg_1min"].append(os.getloadavg()[0])
            say_fxmem(name, rec)
    except Exception as exc:  # noqa: BLE001
        rec.update(failure(exc))
        say_failed(name, label, exc)
    finally:
        st = None
        torch._dynamo.reset()
        gc.collect()
    rec["wall_seconds"] = time.perf_counter() - t0
    return rec


def fxmem_floor(name: str, factory) -> dict:
    """fxmem's smallest feasible budget (its planner's prediction), from a 1-byte budget."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {}
    try:
        w = fresh(factory)
        om = optimize(w["model"], 1, lowering="inductor")
        om(*w["args"], **w["kwargs"])
        rec = {"ok": False, "error": "a 1-byte budget did not raise BudgetError"}
    except fxmem.BudgetError as exc:
        rec = {"ok": exc.floor is not None, "floor": exc.floor, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001
        rec = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        om = w = None
        torch._dynamo.reset()
        gc.collect()
    rec["seconds"] = time.perf_counter() - t0
    say(f"{name} fxmem floor: " + (f"{rec['floor'] / MiB:.1f} MiB" if rec.get("floor")
                                    else rec.get("error", "?")) + f" ({rec['seconds']:.1f}s)")
    return rec


# ---------------------------------------------------------------------------------------------
# one workload


def spread_runs(name: str, factory, floor: dict, unopt: int, runs: list[dict], ns) -> None:
    """fxmem alone at budgets spread from its floor to its unoptimised peak, appended to ``runs``;
    then more budgets in the widest gaps until ``ns.min_fxmem`` runs succeed (at most 4 more)."""
    lo = math.ceil(floor["floor"] / (1.0 - SAFETY_MARGIN) * 1.002)
    hi = max(unopt, lo)
    n = max(2, ns.spread)
    spread = sorted({int(lo + (hi - lo) * k / (n - 1)) for k in range(n)}, reverse=True)
    for i, b in enumerate(spread):
        rec = run_fxmem(name, factory, b, f"fxmem spread {i + 1}/{len(spread)}", ns)
        runs.append(rec)
        retry = 0
        while b == lo and not rec["ok"] and rec.get("floor") and retry < 2:
            # the planner's target is the budget less its margin, and its rounds tighten the
            # target by the simulated excess: just above the floor can still miss
            retry += 1
            b = int(b * 1.03)
            rec = run_fxmem(name, factory, b, f"fxmem spread {i + 1}/{len(spread)} +{3 * retry}%",
                            ns)
            runs.append(rec)
    extra = 0
    while sum(r["ok"] for r in runs) < ns.min_fxmem and extra < 4:
        done = sorted({r["budget"] for r in runs if r["budget"] < 2**50})
        gaps = [(b2 - b1, (b1 + b2) // 2) for b1, b2 in zip(done, done[1:]) if b1 >= lo]
        if not gaps:
            break
        b = max(gaps)[1]
        runs.append(run_fxmem(name, factory, b, f"fxmem extra {extra + 1}", ns))
        extra += 1


def summarize(peers: list[dict], runs: list[dict]) -> dict:
    ok_runs = sorted((r for r in runs if r["ok"] and r["budget"] < 2**50),
                     key=lambda r: -r["budget"])
    violations = []
    for hi_run, lo_run in zip(ok_runs, ok_runs[1:]):
        if lo_run["measured_peak"] > hi_run["measured_peak"]:
            violations.append({"budget_high": hi_run["budget"], "peak_high": hi_run["measured_peak"],
                               "budget_low": lo_run["budget"], "peak_low": lo_run["measured_peak"],
                               "rise_bytes": lo_run["measured_peak"] - hi_run["measured_peak"]})
    return {
        "fxmem_runs_ok": len(ok_runs),
        "fxmem_runs_failed": sum(not r["ok"] for r in runs),
        "within_budget": sum(r["within_budget"] for r in ok_runs),
        "monotone": not violations,
        "monotonicity_violations": violations,
        "no_slower_than": [p["config"] for p in peers if p.get("fxmem_no_slower")],
        "slower_than": [p["config"] for p in peers if p.get("fxmem_no_slower") is False],
        "no_slower_than_by_medians": [p["config"] for p in peers
                                      if p.get("fxmem_time_ratio", 9) <= 1.0],
        "no_slower_than_by_min": [p["config"] for p in peers
                                  if p.get("fxmem_time_ratio_min", 9) <= 1.0],
        "over_budget_at": [p["config"] for p in peers if p.get("fxmem_within_budget") is False],
        "infeasible_at": [p["config"] for p in peers if "fxmem_error" in p],
    }


def run_workload(name: str, ns) -> dict:
    kwargs = {}
    size = getattr(ns, f"{name}_batch", None)
    if size:
        kwargs["batch"] = size
    factory = lambda: WORKLOADS[name](**kwargs)  # noqa: E731
    t_start = time.perf_counter()
    say(f"=== {name} ({kwargs or 'default size'})")
    labels = ["eager", "checkpoint", "compile"] + [f"compile amb={b}" for b in ns.amb.split(",")]
    pairs = [run_pair(name, factory, label, ns) for label in labels]
    peers = [p for p, _ in pairs]
    runs = [r for _, r in pairs if r is not None]

    floor = fxmem_floor(name, factory)
    unopt = next((r["unoptimized_peak"] for r in runs if r["ok"]), None)
    if unopt is None:  # no peer's peak was feasible: a plan at a budget nothing needs
        probe = run_fxmem(name, factory, 2**50, "fxmem probe (no budget)", ns)
        unopt = probe.get("unoptimized_peak")
        runs.append(probe)
    if floor.get("floor") and unopt:
        spread_runs(name, factory, floor, unopt, runs, ns)

    summary = summarize(peers, runs)
    result = {"workload": name, "size": kwargs or "default", "peers": peers, "fxmem_floor": floor,
              "fxmem_unoptimized_peak": unopt, "fxmem": runs, "summary": summary,
              "seconds": time.perf_counter() - t_start}
    result["plot"] = plot_workload(result, ns.out)
    say(f"=== {name} done in {result['seconds']:.0f}s: {summary_line(result)}")
    return result


# ---------------------------------------------------------------------------------------------
# output


def summary_line(result: dict) -> str:
    s = result["summary"]
    no_slower = ", ".join(s["no_slower_than"]) or "none"
    line = (f"measured <= budget in {s['within_budget']}/{s['fxmem_runs_ok']} runs; "
            f"monotone: {'yes' if s['monotone'] else 'no'}; no slower (median paired ratio <= 1) "
            f"than peers: {no_slower}")
    if s["slower_than"]:
        line += f"; slower than: {', '.join(s['slower_than'])}"
    by_medians = ", ".join(s.get("no_slower_than_by_medians", ())) or "none"
    by_min = ", ".join(s["no_slower_than_by_min"]) or "none"
    line += f" (no slower by ratio of medians than: {by_medians}; by fastest step: {by_min})"
    if s["infeasible_at"]:
        line += f"; below fxmem's floor: {', '.join(s['infeasible_at'])}"
    return line


def plot_workload(result: dict, stem: str = "recompute_peers") -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    name = result["workload"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    runs = sorted((r for r in result["fxmem"] if r["ok"] and r["budget"] < 2**50),
                  key=lambda r: r["budget"])
    if runs:
        ax.plot([r["measured_peak"] / MiB for r in runs],
                [1e3 * r["median_step_seconds"] for r in runs],
                "-o", color="black", lw=1.5, ms=4, label="fxmem (sorted by budget)", zorder=3)
    markers = "sDv^<>pPX*"
    for i, p in enumerate(q for q in result["peers"] if q["ok"]):
        x, y = p["measured_peak"] / MiB, 1e3 * p["median_step_seconds"]
        ax.scatter([x], [y], marker=markers[i % len(markers)], s=70, zorder=4, label=p["config"])
        ax.annotate(p["config"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    floor = result["fxmem_floor"].get("floor")
    if floor:
        ax.axvline(floor / MiB, color="gray", ls=":", lw=1, label="fxmem floor (predicted)")
    ax.set_xlabel("measured peak (MiB)")
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"{name}: step time vs peak memory (cpu)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = RESULTS / f"{stem}_{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path.relative_to(ROOT))


def _load(r) -> str:
    return "/".join(f"{x:.1f}" for x in r.get("loadavg_1min", ()))


def _mib(x) -> str:
    return "" if x is None else f"{x / MiB:.1f}"


def workload_table(result: dict) -> list[str]:
    lines = [
        f"## {result['workload']}",
        "",
        "| configuration | measured peak MiB | step ms median | step ms min | n | first call s | "
        "budget MiB | predicted MiB | within budget | time vs target (paired; medians; mins) | "
        "solve s | gap | status | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["peers"]:
        if not p["ok"]:
            lines.append(f"| {p['config']} | error: {p['error'].splitlines()[0][:120]} "
                         "| | | | | | | | | | | | |")
            continue
        lines.append(f"| {p['config']} | {_mib(p['measured_peak'])} | "
                     f"{1e3 * p['median_step_seconds']:.0f} | {1e3 * p['min_step_seconds']:.0f} | "
                     f"{len(p['step_seconds'])} | "
                     f"{p['first_call_seconds']:.1f} | | | | | | | | {_load(p)} |")
    for r in sorted(result["fxmem"], key=lambda r: -r["budget"]):
        if r["budget"] >= 2**50:
            continue
        if not r["ok"]:
            why = (f"infeasible (floor {_mib(r.get('floor'))} MiB)" if r.get("floor")
                   else r["error"].splitlines()[0][:120])
            lines.append(f"| {r['config']} | {why} | | | | | {_mib(r['budget'])} | | | | | | | |")
            continue
        ratio = ("" if r.get("paired_ratio_median") is None else
                 f"{r['paired_ratio_median']:.2f}; {r['time_ratio_vs_target']:.2f}; "
                 f"{r['time_ratio_vs_target_min']:.2f}")
        gap = "n/a" if r["gap"] is None else f"{100 * r['gap']:.2f}%"
        lines.append(
            f"| {r['config']} | {_mib(r['measured_peak'])} | {1e3 * r['median_step_seconds']:.0f} | "
            f"{1e3 * r['min_step_seconds']:.0f} | {len(r['step_seconds'])} | "
            f"{r['first_call_seconds']:.1f} | {_mib(r['budget'])} | {_mib(r['predicted_peak'])} | "
            f"{'yes' if r['within_budget'] else '**no**'} | {ratio} | {r['solve_seconds']:.2f} | "
            f"{gap} | {r['status']} | {_load(r)} |")
    floor = result["fxmem_floor"]
    lines += [
        "",
        f"fxmem floor (planner's prediction): {_mib(floor.get('floor')) or floor.get('error')} MiB; "
        f"unoptimised peak (predicted): {_mib(result['fxmem_unoptimized_peak'])} MiB. "
        f"Wall time {result['seconds']:.0f} s.",
        "",
        f"**Summary:** {summary_line(result)}.",
        "",
    ]
    for v in result["summary"]["monotonicity_violations"]:
        lines.append(f"- monotonicity: budget {_mib(v['budget_high'])} -> {_mib(v['budget_low'])} "
                     f"MiB raised the measured peak {_mib(v['peak_high'])} -> {_mib(v['peak_low'])} "
                     f"MiB (+{v['rise_bytes']} B)")
    if result.get("plot"):
        lines += ["", f"![{result['workload']}]({Path(result['plot']).name})", ""]
    return lines




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-timed-seconds", type=float, default=12.0,
                        help="a peer and fxmem @ peer get more than --repeats timed steps each "
                             "when their steps are fast, until each side's take this long")
    parser.add_argument("--warmup", type=int, default=1, help="steps after the first (compiling) call")
    parser.add_argument("--amb", default=AMB_DEFAULT, help="activation_memory_budget values")
    parser.add_argument("--spread", type=int, default=4,
                        help="fxmem budgets spread from the floor to the unoptimised peak")
    parser.add_argument("--min-fxmem", type=int, default=6,
                        help="add budgets until this many fxmem runs succeed (at most 4 more)")
    for name in WORKLOADS:
        parser.add_argument(f"--{name.replace('_', '-')}-batch", type=int, default=None,
                            dest=f"{name}_batch", help=f"batch size of {name} (default: factory's)")
    parser.add_argument("--out", default="recompute_peers", help="results file stem")
    ns = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # every configuration compiles afresh: a cache hit would skip fxmem's partitioner, and
    # activation_memory_budget must take effect
    torch._functorch.config.enable_autograd_cache = False
    torch._inductor.config.fx_graph_cache = False
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": "cpu",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "repeats": ns.repeats,
        "min_timed_seconds": ns.min_timed_seconds,
        "warmup": ns.warmup,
    }
    try:
        env["transformers"] = __import__("transformers").__version__
    except ImportError:
        pass
    results = []
    for name in ns.workloads.split(","):
        try:
            results.append(run_workload(name, ns))
        except Exception as exc:  # noqa: BLE001
            say(f"=== {name}: FAILED {type(exc).__name__}: {exc}")
            results.append({"workload": name, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=10)})
        write(results, env, ns)  # after every workload: partial results survive
    env["total_seconds"] = time.perf_counter() - _T0
    write(results, env, ns)
    say(f"done in {env['total_seconds']:.0f}s")
    return 0


def write(results: list[dict], env: dict, ns) -> None:
    (RESULTS / f"{ns.out}.json").write_text(json.dumps({"env": env, "workloads": results},
                                                       indent=2, default=str))
    md = [
        "# fxmem against checkpointing and torch.compile's memory budget (CPU)",
        "",
        f"{env['date']}, torch {env['torch']}, {env['cpu']} ({env['threads']} threads); "
        f"{env['repeats']} timed steps (a peer and fxmem @ peer: at least "
        f"{env.get('min_timed_seconds', 0):g} s of them each, `n` in the tables) after "
        f"{env['warmup']} warm-up step(s) following the first (compiling) call.",
        "",
        "A step is forward + loss + backward (no optimizer), gradients set to None before it. "
        "Peak: `fxmem.measure_memory` of one step, counting the bytes the model and the inputs "
        "hold at the start plus the CPU allocator's events during the step. `fxmem @ X` is "
        "`fxmem.optimize(model, budget=peak of X, lowering=\"inductor\")`, built while X is still "
        "alive; the two are then timed together, in alternating blocks of two timed steps "
        "(X, fxmem; fxmem, X; ...), each block after one untimed step (the switch changes what "
        "the CPU allocator holds), so that both see the same machine load. `time vs target`: the "
        "median of fxmem's i-th timed step over X's i-th (the verdict: <= 1.00 is no slower), "
        "then fxmem's median step over X's "
        "and fxmem's fastest step over X's. The step times of X and `fxmem @ X` are from those "
        "rounds; the spread budgets (and a peer at whose peak fxmem fails) are timed alone, "
        "so compare their times across rows with care. `load`: the 1-minute load average "
        "before the configuration's first call / after its timed steps (the machine has 2 "
        "cores shared with other jobs). `compile amb=b` is "
        "`torch.compile(model)` compiled under `torch._functorch.config.activation_memory_budget=b`. "
        "Predicted peaks and the floor are fxmem's planner's (its model of what Inductor "
        "materialises for the partitioned graphs, `fxmem.inductor_memory`; the plan leaves a "
        f"{100 * SAFETY_MARGIN:.0f}% margin under the budget).",
        "",
    ]
    for r in results:
        if "error" in r:
            md += [f"## {r['workload']}", "", f"error: {r['error']}", ""]
        else:
            md += workload_table(r)
    if "total_seconds" in env:
        md += [f"Total run time {env['total_seconds']:.0f} s. Reproduce: "
               f"`python bench/recompute_peers.py {' '.join(env['argv'])}`".rstrip(), ""]
    (RESULTS / f"{ns.out}.md").write_text("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
