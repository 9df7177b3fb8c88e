"""One-shot GPU check: fxmem on the three bench workloads at three budgets each, on CUDA.

On a machine with a CUDA GPU, run from the repository root (about 8 minutes at most)::

    python bench/gpu_check.py

It writes ``bench/results/gpu_<device>.md`` and ``.json`` (``<device>`` is the GPU's name,
e.g. ``gpu_nvidia_h200.md``) and prints the table. Commit them, then set fxmem's GPU margin
(``fxmem.planning.options.default_margin`` for Inductor off the CPU) from the last line: the
largest measured excess over the predicted peak, as a fraction of the budget.

For each workload of ``bench/workloads.py`` (``gpt_decoder``, ``wrn_28_2``, ``hf_gpt2``, at the
factories' sizes), in one process:

1. **eager**: the model as it is -- its peak, its median step time, and the reference
   gradients (one step under a fixed seed; dropout included);
2. **torch.compile**: ``torch.compile(model)`` (Inductor, default partitioner) -- its peak and
   step time; it stays alive as the time reference of the fxmem runs;
3. **bounds**: fxmem's floor and unoptimised peak (one plan at a 1-byte budget: its
   ``BudgetError`` names both, as :func:`fxmem.floor` does);

then, the three workloads taking turns (so that a deadline cuts each alike):

4. **fxmem at 3 budgets**: the unoptimised peak and two points between the floor and it
   (``--positions``: 1.0, 0.5 and 0.15 of the way up from the floor). Each is
   ``fxmem.optimize(model, budget, lowering="inductor")`` on a fresh model (seed 0): its first
   (compiling) call, a warm-up step, one step measured with :func:`fxmem.measure_peak`
   (``torch.cuda.max_memory_allocated`` after resetting the peak), one step under the
   reference's seed whose gradients are compared with eager's (the largest relative L2 error
   over the parameters; fxmem draws random numbers as eager PyTorch does, so they should agree
   to rounding), then ``--repeats`` timed steps each of fxmem and ``torch.compile``, alternated
   (fxmem, compile; compile, fxmem; ...), synchronised, so both see the same machine; the
   time ratio is the median of fxmem's i-th step over compile's i-th.

A step is forward + loss + backward with the gradients set to None before it (no optimizer).
A measured peak counts the bytes the configuration's own step holds: the device's peak during
the step minus what was allocated on the device before its model was built (the live
``torch.compile`` references, workspaces of earlier runs). The deadline (``--deadline``, 450 s
from the start): a piece of work (a workload's set-up, an fxmem run) starts only when the
longest of its kind so far would still end before it; what is skipped is marked so in the table.

``--dry-run`` (automatic without a CUDA device) runs the same code on the CPU with tiny versions
of the workloads (the bench factories' size arguments: one layer of width 64, WRN-10-1),
fxmem's ``lowering="eager"`` and ``torch.compile(backend="aot_eager")`` (Inductor's C++
compiles would take minutes on a CPU), one thread, a 1 s ILP time limit and 2 timed steps,
writing to a temporary directory instead of ``bench/results``; ``make test`` runs it
(``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch._dynamo

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from bench.environment import cpu_name  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402
from fxmem.planning.options import default_margin  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MiB = 2**20
SEED = 1234  # the seed of the gradient comparison's step (dropout masks)
POSITIONS = "1.0,0.5,0.15"  # budgets: this far up from fxmem's floor to its unoptimised peak
# the dry run's tiny versions of the workloads (fewer, narrower layers: tracing, planning and
# compiling take the time; activations still outweigh the weights, so there is recomputing to do)
DRY_SIZES = {
    "gpt_decoder": dict(batch=4, seq=32, n_layer=1, d_model=64, n_head=2, vocab_size=256),
    "wrn_28_2": dict(batch=8, depth=10, widen_factor=1, image=16),
    "hf_gpt2": dict(batch=4, seq=32, n_layer=1, n_embd=64, n_head=2, vocab_size=256),
}
GRAD_TOLERANCE = {"cuda": 2e-2, "cpu": 1e-4}  # the largest relative L2 error accepted


class Clock:
    """Seconds since the start, the deadline, and a log line with the time. ``fits(kind)``: the
    longest piece of work of that kind so far would still end before the deadline."""

    def __init__(self, deadline: float):
        self.t0 = time.perf_counter()
        self.deadline = deadline
        self.longest: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, kind: str) -> bool:
        return self.elapsed() + self.longest.get(kind, 0.0) <= self.deadline

    def took(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(self.longest.get(kind, 0.0), seconds)

    def skipped(self, kind: str) -> str:
        return (f"deadline: {self.elapsed():.0f} s gone, the longest {kind} so far took "
                f"{self.longest.get(kind, 0.0):.0f} s, the deadline is {self.deadline:g} s")

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# one configuration's step


def build(name: str, sizes: dict, device: torch.device) -> dict:
    """The workload from its factory (seed 0), model and inputs on ``device``."""
    w = WORKLOADS[name](**sizes)
    w["model"] = w["model"].to(device)
    w["args"] = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in w["args"])
    w["kwargs"] = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                   for k, v in w["kwargs"].items()}
    return w


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_bytes(device: torch.device) -> int:
    """Bytes allocated on the device now (0 on the CPU, where measurement counts roots)."""
    if device.type == "cuda":
        sync(device)
        return torch.cuda.memory_allocated(device)
    return 0


class Stepper:
    """Forward + loss + backward of ``fn`` on the workload's inputs, gradients set to None first."""

    def __init__(self, fn: Callable, w: dict, device: torch.device):
        self.fn, self.model, self.args, self.kwargs = fn, w["model"], w["args"], w["kwargs"]
        self.device = device
        self.other = 0  # bytes on the device before this configuration's model was built

    def zero(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def step(self) -> None:
        out = self.fn(*self.args, **self.kwargs)
        fxmem.loss_from_output(out).backward()
        del out

    def timed(self) -> float:
        self.zero()
        sync(self.device)
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - t0

    def first_call(self, warmup: int = 1) -> float:
        """The first (compiling) call's seconds, then ``warmup`` untimed steps."""
        seconds = self.timed()
        for _ in range(warmup):
            self.timed()
        self.zero()
        return seconds

    def peak(self) -> int:
        """The step's peak bytes: on CUDA the device's peak minus what others held before the
        model was built; on the CPU the model's and inputs' bytes plus the allocator's events."""
        self.zero()
        gc.collect()
        if self.device.type == "cuda":
            peak = fxmem.measure_peak(self.step, device=self.device) - self.other
        else:
            peak = fxmem.measure_peak(self.step, device=self.device,
                                      baseline=[self.model, list(self.args),
                                                list(self.kwargs.values())])
        self.zero()
        return peak

    def grads(self) -> list[torch.Tensor | None]:
        """The gradients of one step under :data:`SEED`, on the CPU."""
        self.zero()
        torch.manual_seed(SEED)
        self.step()
        grads = [None if p.grad is None else p.grad.detach().float().cpu()
                 for p in self.model.parameters()]
        self.zero()
        return grads


def grad_error(reference: list, got: list) -> float:
    """The largest relative L2 error of ``got`` against ``reference`` over the parameters
    (inf where one has a gradient and the other not)."""
    worst = 0.0
    for a, b in zip(reference, got, strict=True):
        if a is None or b is None:
            if (a is None) != (b is None):
                return math.inf
            continue
        worst = max(worst, float((b - a).norm() / a.norm().clamp_min(1e-12)))
    return worst


def paired_times(a: Stepper, b: Stepper, repeats: int) -> tuple[list[float], list[float]]:
    """``repeats`` timed steps of each, alternated (a, b; b, a; ...) after one untimed step each."""
    a.timed()
    b.timed()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(repeats):
        for st, times in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            times.append(st.timed())
    a.zero()
    b.zero()
    return ta, tb


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_record(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            "traceback": traceback.format_exc(limit=8)}


# ---------------------------------------------------------------------------------------------
# a workload


class Setup:
    """A workload's reference: its sizes, eager gradients, and the live torch.compile step."""

    def __init__(self, name: str, sizes: dict, reference: list, peer: Stepper):
        self.name, self.sizes, self.reference, self.peer = name, sizes, reference, peer


def setup_workload(name: str, ns, device: torch.device, clock: Clock,
                   positions: list[float]) -> tuple[dict, Setup]:
    """Eager and torch.compile measured, fxmem's floor and unoptimised peak, the budgets."""
    sizes = DRY_SIZES[name] if ns.dry_run else {}
    rec: dict[str, Any] = {"workload": name, "sizes": sizes, "budgets": []}

    # 1. eager: peak, time, reference gradients
    other = device_bytes(device)
    w = build(name, sizes, device)
    eager = Stepper(w["model"], w, device)
    eager.other = other
    eager.first_call()
    rec["eager_peak"] = eager.peak()
    rec["eager_ms"] = 1e3 * statistics.median(eager.timed() for _ in range(ns.repeats))
    reference = eager.grads()
    rec["parameters"] = sum(p.numel() for p in w["model"].parameters())
    del w, eager
    free(device)
    clock.say(f"{name}: eager peak {_mib(rec['eager_peak'])} MiB, {rec['eager_ms']:.1f} ms a step")

    # 2. torch.compile: peak, time; kept alive as the time reference
    other = device_bytes(device)
    wp = build(name, sizes, device)
    peer = Stepper(torch.compile(wp["model"], backend=ns.compile_backend), wp, device)
    peer.other = other
    rec["compile_first_call_s"] = peer.first_call()
    rec["compile_peak"] = peer.peak()
    rec["compile_ms"] = 1e3 * statistics.median(peer.timed() for _ in range(ns.repeats))
    clock.say(f"{name}: torch.compile peak {_mib(rec['compile_peak'])} MiB, "
              f"{rec['compile_ms']:.1f} ms a step (first call {rec['compile_first_call_s']:.1f}s)")

    # 3. fxmem's floor and unoptimised peak, from one plan (no kernels generated, nothing run)
    wb = build(name, sizes, device)
    module = fxmem.optimize(wb["model"], 1, allow=("recompute",), lowering=ns.lowering,
                            time_limit=ns.time_limit)
    try:
        module.plan_for(*wb["args"], **wb["kwargs"])
        raise RuntimeError("a 1-byte budget was met")  # nothing is held: cannot happen
    except fxmem.BudgetError as exc:
        floor, unoptimized = int(exc.floor), int(exc.unoptimized)
    del wb, module
    free(device)
    rec["floor"], rec["unoptimized_peak"] = floor, unoptimized
    rec["budgets"] = [{"budget": int(floor + t * (unoptimized - floor)), "position": t}
                      for t in positions]
    clock.say(f"{name}: fxmem floor {_mib(floor)} MiB, unoptimised {_mib(unoptimized)} MiB; "
              "budgets " + ", ".join(_mib(r["budget"]) for r in rec["budgets"]) + " MiB")
    return rec, Setup(name, sizes, reference, peer)


def budget_run(setup: Setup, row: dict, ns, device: torch.device, clock: Clock) -> None:
    """fxmem at ``row["budget"]`` against the live torch.compile step; fills ``row``."""
    name, budget = setup.name, row["budget"]
    t0 = time.perf_counter()
    try:
        run_budget(name, setup.sizes, budget, row, setup.reference, setup.peer, ns, device)
    except Exception as exc:  # noqa: BLE001 - one failing configuration must not stop the run
        row.update(error_record(exc))
    finally:
        free(device)
    row["seconds"] = time.perf_counter() - t0
    if "error" in row:
        clock.say(f"{name} @ {_mib(budget)} MiB: FAILED {row['error']}")
    else:
        clock.say(f"{name} @ {_mib(budget)} MiB: predicted {_mib(row['predicted'])}, measured "
                  f"{_mib(row['measured'])} MiB ({'within' if row['within_budget'] else 'OVER'}), "
                  f"time x{row['time_ratio']:.2f} of torch.compile, grads rel err "
                  f"{row['grad_error']:.1e} ({row['seconds']:.1f}s)")


def run_budget(name: str, sizes: dict, budget: int, row: dict, reference: list, peer: Stepper,
               ns, device: torch.device) -> None:
    other = device_bytes(device)
    w = build(name, sizes, device)
    model = fxmem.optimize(w["model"], budget, allow=("recompute",), lowering=ns.lowering,
                           time_limit=ns.time_limit)
    st = Stepper(model, w, device)
    st.other = other
    row["first_call_s"] = st.first_call()
    plan = model.plan
    row.update(predicted=plan.predicted_peak, unoptimized_peak=plan.unoptimized_peak,
               recomputed=len(plan.record.recomputed), replayed=len(plan.record.replayed),
               solve_s=plan.solution.solve_seconds, plan_s=plan.plan_seconds,
               status=plan.solution.status, margin=plan.options.safety_margin)
    row["measured"] = st.peak()
    row["within_budget"] = row["measured"] <= budget
    row["grad_error"] = grad_error(reference, st.grads())
    row["grads_ok"] = row["grad_error"] <= GRAD_TOLERANCE[device.type]
    fx_times, peer_times = paired_times(st, peer, ns.repeats)
    row["fxmem_ms"] = 1e3 * statistics.median(fx_times)
    row["compile_ms"] = 1e3 * statistics.median(peer_times)
    row["time_ratio"] = statistics.median(f / p for f, p in zip(fx_times, peer_times))


# ---------------------------------------------------------------------------------------------
# results


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "device"


def _mib(x) -> str:
    return "" if x is None else f"{x / MiB:.2f}"


def table(results: list[dict], env: dict) -> str:
    lines = [
        f"# fxmem GPU check: {env['device_name']}" + (" (CPU dry run)" if env["dry_run"] else ""),
        "",
        f"{env['date']}, torch {env['torch']}, {env['device_name']}; fxmem "
        f"`lowering=\"{env['lowering']}\"` against `torch.compile(backend=\"{env['compile_backend']}\")`; "
        f"{env['repeats']} timed steps each (alternated); deadline {env['deadline']:g} s. "
        "A step is forward + loss + backward (no optimizer). Budgets: fxmem's unoptimised peak "
        "and points between its floor and it (`position`: 1 = the unoptimised peak, 0 = the "
        "floor). Measured: `fxmem.measure_peak` of one step "
        + ("(`torch.cuda.max_memory_allocated` after resetting the peak) minus the bytes "
           "allocated on the device before the configuration's model was built. "
           if env["device"].startswith("cuda") else
           "(the model's and inputs' bytes plus the CPU allocator's events). ")
        + "`time`: the median of fxmem's i-th step time over torch.compile's i-th. `grads`: "
        "the largest relative L2 error of fxmem's gradients against eager PyTorch's under the "
        "same seed.",
        "",
        "| workload | budget MiB | position | predicted MiB | measured MiB | within budget | "
        "recomputed ops | fxmem ms | compile ms | time (fxmem / compile) | grads rel err | "
        "first call s | solve s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in results:
        name = r["workload"]
        if "error" in r and not r.get("budgets"):
            lines.append(f"| {name} | error: {r['error']} | | | | | | | | | | | |")
            continue
        for row in r["budgets"]:
            head = f"| {name} | {_mib(row['budget'])} | {row['position']:g} |"
            if "skipped" in row:
                lines.append(f"{head} skipped: {row['skipped']} | | | | | | | | | |")
            elif "error" in row:
                lines.append(f"{head} error: {row['error']} | | | | | | | | | |")
            elif "measured" not in row:  # partial results: not run yet
                lines.append(f"{head} not run yet | | | | | | | | | |")
            else:
                lines.append(
                    f"{head} {_mib(row['predicted'])} | {_mib(row['measured'])} | "
                    f"{'yes' if row['within_budget'] else '**no**'} | {row['recomputed']} | "
                    f"{row['fxmem_ms']:.1f} | {row['compile_ms']:.1f} | {row['time_ratio']:.2f} | "
                    f"{row['grad_error']:.1e}{'' if row['grads_ok'] else ' **no**'} | "
                    f"{row['first_call_s']:.1f} | {row['solve_s']:.2f} |")
        if "eager_peak" in r:
            notes.append(
                f"- {name} ({r['parameters'] / 1e6:.1f}M parameters"
                + (f", {r['sizes']}" if r["sizes"] else "") + f"): eager "
                f"{_mib(r['eager_peak'])} MiB, {r['eager_ms']:.1f} ms; torch.compile "
                f"{_mib(r.get('compile_peak'))} MiB, "
                + (f"{r['compile_ms']:.1f} ms" if "compile_ms" in r else "-")
                + (f"; fxmem floor {_mib(r['floor'])} MiB, unoptimised {_mib(r['unoptimized_peak'])} "
                   "MiB" if "floor" in r else "")
                + (f". Error: {r['error']}" if "error" in r else ""))
    lines += ["", *notes, ""]
    s = summary(results, len(env["positions"]))
    lines.append(
        f"**Summary:** {s['ran']} of {s['planned']} runs done ({s['skipped']} skipped at the "
        f"deadline, {s['failed']} failed); {s['within']} within budget; gradients agree in "
        f"{s['grads_ok']}; the largest measured excess over the predicted peak is "
        f"{100 * s['max_excess']:+.2f}% of the budget (margin in use: "
        f"{100 * env['margin']:g}%). Total {env.get('total_seconds', 0):.0f} s.")
    lines.append("")
    return "\n".join(lines)


def summary(results: list[dict], per_workload: int) -> dict:
    """Counts over the fxmem runs (``per_workload`` budgets each) and the largest excess of a
    measured peak over its prediction, as a fraction of the budget."""
    rows = [row for r in results for row in r.get("budgets", ())]
    done = [row for row in rows if "measured" in row and "error" not in row]
    return {
        "planned": per_workload * len(results),
        "ran": len(done),
        "skipped": sum("skipped" in row for row in rows),
        "failed": sum("error" in row for row in rows) + sum(
            per_workload - len(r.get("budgets", ())) for r in results if "error" in r),
        "within": sum(row["within_budget"] for row in done),
        "grads_ok": sum(row["grads_ok"] for row in done),
        "max_excess": max([(row["measured"] - row["predicted"]) / row["budget"]
                           for row in done] or [0.0]),
    }


def write(results: list[dict], env: dict, out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"env": env, "workloads": results}, indent=2,
                                                 default=str))
    md = out / f"{stem}.md"
    md.write_text(table(results, env))
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0],
        epilog="On a CUDA machine just run `python bench/gpu_check.py`; see the module docstring.")
    parser.add_argument("--dry-run", action="store_true",
                        help="the CPU, tiny workloads, fxmem's eager lowering and "
                             "torch.compile(backend='aot_eager'), results in a temp dir "
                             "(automatic without a CUDA device)")
    parser.add_argument("--out", help="results directory (default: bench/results; dry run: a "
                                      "new temporary directory)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--positions", default=POSITIONS,
                        help="the budgets, as positions from fxmem's floor (0) to its "
                             f"unoptimised peak (1); default {POSITIONS}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per configuration (default 10; dry run 2)")
    parser.add_argument("--deadline", type=float, default=450.0,
                        help="seconds from the start: work that would end after it is skipped "
                             "(judged by the longest of its kind so far)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="the ILP's time limit in seconds (default 10; dry run 1)")
    parser.add_argument("--lowering", default=None, choices=["eager", "inductor"],
                        help="fxmem's lowering (default inductor; dry run eager)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile's backend (default inductor; dry run aot_eager)")
    ns = parser.parse_args(argv)
    clock = Clock(ns.deadline)
    threads = torch.get_num_threads()
    if not ns.dry_run and not torch.cuda.is_available():
        clock.say("no CUDA device: running the CPU dry run (--dry-run)")
        ns.dry_run = True
    device = torch.device("cpu") if ns.dry_run else torch.device("cuda", torch.cuda.current_device())
    ns.repeats = ns.repeats or (2 if ns.dry_run else 10)
    ns.time_limit = ns.time_limit or (1.0 if ns.dry_run else 10.0)
    if ns.dry_run:  # tiny steps: a second thread only waits on a loaded machine
        torch.set_num_threads(1)
    ns.lowering = ns.lowering or ("eager" if ns.dry_run else "inductor")
    ns.compile_backend = ns.compile_backend or ("aot_eager" if ns.dry_run else "inductor")
    if ns.out:
        out = Path(ns.out)
    elif ns.dry_run:
        out = Path(tempfile.mkdtemp(prefix="fxmem_gpu_check_"))
    else:
        out = RESULTS
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    stem = "gpu_" + ("dry_run_cpu" if ns.dry_run else slug(device_name))
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name,
        "dry_run": ns.dry_run,
        "lowering": ns.lowering,
        "compile_backend": ns.compile_backend,
        "repeats": ns.repeats,
        "time_limit": ns.time_limit,
        "threads": torch.get_num_threads(),
        "deadline": ns.deadline,
        "margin": default_margin(ns.lowering, device),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    clock.say(f"fxmem GPU check on {device_name} ({device}); results to {out / stem}.md")
    positions = [float(x) for x in ns.positions.split(",")]
    env["positions"] = positions
    results: list[dict] = []
    setups: list[Setup | None] = []
    torch._dynamo.reset()
    try:
        for name in ns.workloads.split(","):
            setup = None
            if not clock.fits("set-up"):
                rec = {"workload": name, "budgets": [
                    {"budget": None, "position": t, "skipped": clock.skipped("set-up")}
                    for t in positions]}
                clock.say(f"{name}: skipped ({clock.skipped('set-up')})")
            else:
                t0 = time.perf_counter()
                try:
                    rec, setup = setup_workload(name, ns, device, clock, positions)
                except Exception as exc:  # noqa: BLE001 - the other workloads still run
                    clock.say(f"{name}: FAILED {type(exc).__name__}: {exc}")
                    rec = {"workload": name, **error_record(exc)}
                    free(device)
                clock.took("set-up", time.perf_counter() - t0)
            results.append(rec)
            setups.append(setup)
            write(results, env, out, stem)  # partial results survive
        for i in range(len(positions)):  # the workloads take turns
            for rec, setup in zip(results, setups):
                if setup is None:
                    continue
                row = rec["budgets"][i]
                if not clock.fits("fxmem run"):
                    row["skipped"] = clock.skipped("fxmem run")
                    clock.say(f"{setup.name} @ {_mib(row['budget'])} MiB: skipped "
                              f"({row['skipped']})")
                    continue
                budget_run(setup, row, ns, device, clock)
                clock.took("fxmem run", row["seconds"])
                write(results, env, out, stem)
    finally:
        setups.clear()
        free(device)
        torch.set_num_threads(threads)
    env["total_seconds"] = clock.elapsed()
    md = write(results, env, out, stem)
    print()
    print(md.read_text())
    print(f"wrote {md} and {md.with_suffix('.json')}")
    s = summary(results, len(positions))
    ok = s["failed"] == 0 and s["within"] == s["ran"] and s["grads_ok"] == s["ran"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
