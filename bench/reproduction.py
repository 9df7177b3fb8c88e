"""The technical report's headline reproduced and measured (issue 20, "Reproduction (bench/)").

The 2019 report fitted WideResNet-28-2 in 60.7x less memory and a Transformer in 8.7x, by
accounting. Here each step is measured. Two workloads, each in three modes trained from the same
seed on the same batches (:func:`bench.accuracy.train`, the loop bench/accuracy.py runs):

- ``wrn``: WideResNet-28-2 on scikit-learn's digits at 3x32x32, batch 128, SGD (lr 0.05,
  momentum 0.9, Nesterov, weight decay 5e-4), warm-up + cosine (:func:`bench.accuracy.wrn_task`);
  metric: test accuracy.
- ``lm``: the bench's ``gpt_decoder`` (:class:`fxmem.examples.GPT`: 6 layers, 8 heads, d_model
  512, vocabulary 8192, context 256, dropout 0.1, tied embeddings), batch 8 x 256 bytes of the
  Python standard library's sources (byte ids 0-255 of its 8192), AdamW (lr 1e-3, betas 0.9 /
  0.95, weight decay 0.01), warm-up + cosine (:func:`bench.accuracy.lm_task`); metric: validation
  loss (nats/byte).

Modes:

- ``eager``: eager PyTorch in fp32, the baseline.
- ``exact``: ``fxmem.optimize(model, budget, optimizer=opt, allow=("recompute", "microbatch"))``.
- ``all``: ``allow=("recompute", "microbatch", "precision", "sparse")``; for ``wrn`` with
  ``microbatch_coupling="per-microbatch"`` (BatchNorm's batch statistics then come from each
  microbatch: not exact; this mode only).
- ``all-state``: ``all``, with the optimizer's state in fewer bits as the ``BudgetError`` of
  ``all`` suggests (the precision lever's third part, a call the user makes since fxmem cannot
  swap the optimizer a loop steps): ``opt = fxmem.low_bit_optimizer(opt, bits=8)`` for AdamW
  (torchao's blockwise 8-bit moments), ``bits="bf16"`` for SGD with momentum (torchao has no
  low-bit SGD), before planning.

**The budget** of a planned mode is the smallest fxmem meets: its floor is the
:class:`fxmem.BudgetError`'s ``floor`` for a 1-byte budget on the first training batch (planned,
nothing run), and the mode is planned at ``--margin`` times it (1.03); if that plan raises
``BudgetError`` the next of ``--margins`` is tried. With every lever allowed, the floor is the
sparse lever's sparsest density (with bf16 compute when that is what reached it, as the error
says); the plan at the budget is then made with that density and precision forced
(``sparse_density=``, ``precision="bf16"``) instead of fxmem's search of every density from 0.5
down (five plans, each choosing k among up to 8 microbatch counts: too long on 2 CPU cores),
unless ``--search``. The microbatch count and what is recomputed are fxmem's choice.
``--budget wrn=7.99`` plans the lossy modes at that budget instead (no floor search: 485.29 MiB,
the eager step's peak, over 60.7 is 7.99 MiB), ``--density wrn=0.1`` forces a density (with bf16)
and ``--microbatches wrn=32`` a microbatch count: the floor's plan (one image per microbatch at
density 0.05) does not train, BatchNorm normalising over one image.

**Measured**: step 1 of each training run (step 0 plans and compiles) under
:func:`fxmem.measure_memory`: the bytes the model, the batch and the optimizer hold at its start
(parameters, buffers, optimizer state, sparse index buffers) plus the allocator's events through
forward, backward, ``opt.step()``, the scheduler and ``opt.zero_grad(set_to_none=True)``, the
loss held to the end. Reduction = the eager step's measured peak / the mode's.

Writes ``bench/results/<out>.{md,json,png}`` (default ``reproduction``), rewritten after every
run so a crash keeps what finished.

    python bench/reproduction.py                      # both workloads, default steps
    python bench/reproduction.py --workloads wrn --wrn-steps 22
    python bench/reproduction.py --quick              # a smoke run: tiny models, 2 steps
    python bench/reproduction.py --out reproduction_wrn_60x --workloads wrn --wrn-steps 220 \
        --budget wrn=7.99 --density wrn=0.1 --microbatches wrn=32   # bench/results/
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from bench.accuracy import Prepared, lm_task, train, wrn_task  # noqa: E402
from bench.environment import cpu_name  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MiB = 2**20
EXACT = ("recompute", "microbatch")
ALL = ("recompute", "microbatch", "precision", "sparse")
MODES = ("eager", "exact", "all", "all-state")
LOSSY = ("all", "all-state")
TARGETS = {"wrn": (60.7, 100.0), "lm": (8.7, 10.0)}  # the report's, and the aim
# the bench gpt_decoder's model and batch (bench/workloads.py)
GPT_DECODER = dict(n_layer=6, n_head=8, d_model=512, vocab_size=8192, batch=8, seq=256)
QUICK_SIZES = {"wrn": dict(batch=8, depth=10, widen_factor=1),
               "lm": dict(n_layer=2, n_head=2, d_model=32, vocab_size=256, batch=4, seq=16,
                          n_val=1)}
DEFAULT_STEPS = {"wrn": 55, "lm": 40}  # wrn: 5 epochs of 11 batches (bench/accuracy.py's)
QUICK_STEPS = {"wrn": 2, "lm": 2}
MEASURE_STEP = 1


def make_task(name: str, steps: int, quick: bool):
    if name == "wrn":
        return wrn_task(steps, quick, **(QUICK_SIZES["wrn"] if quick else {}))
    return lm_task(steps, quick, **(QUICK_SIZES["lm"] if quick else GPT_DECODER))


def first_batch(task, seed: int):
    """The first training batch (the one each mode's step 0 plans on)."""
    return next(task.batches(torch.Generator().manual_seed(seed + 1)))


# ------------------------------------------------------------------------------ floors


def find_floor(model, opt, x, y, allow, ns, coupling: str, microbatches: int | None) -> dict:
    """The BudgetError of a 1-byte budget (planned, nothing run): the floor, the unoptimised peak,
    and -- with every lever -- the density and precision that reached it."""
    t0 = time.perf_counter()
    module = fxmem.optimize(model, 1, optimizer=opt, allow=allow, lowering=ns.lowering,
                            time_limit=ns.time_limit, microbatch_coupling=coupling,
                            microbatches=microbatches)
    try:
        module.plan_for(x, y)
    except fxmem.BudgetError as exc:
        text = str(exc)
        # the sparse lever reached the floor: its error leads (the dense floor after ';')
        density = re.search(r"sparsified at density ([0-9.]+), the sparse lever's sparsest;",
                            text)
        return {"floor": int(exc.floor), "unoptimized": exc.unoptimized,
                "holders": dict(exc.holders), "message": text,
                "density": float(density.group(1)) if density else None,
                # bf16 reached the floor: its error leads (with the exact levers' after ';')
                "bf16": "bfloat16 compute casts, the precision lever;" in text,
                "seconds": time.perf_counter() - t0}
    raise AssertionError("a 1-byte budget was met")


def planned(name: str, mode: str, ns, info: dict):
    """``prepare`` for :func:`bench.accuracy.train`: the floor on the first batch, then
    ``fxmem.optimize`` at the first margin whose plan fits (planned here, before training)."""
    allow = EXACT if mode == "exact" else tuple(ns.all_allow)
    coupling = "per-microbatch" if (mode in LOSSY and name == "wrn") else "refuse"
    # a forced microbatch count for the lossy modes (--microbatches): BatchNorm then normalises
    # over batch/k samples, not over the 1 sample the smallest floor may take
    micro = ns.microbatches.get(name) if mode in LOSSY else None
    task = info["task"]

    fixed = ns.budgets.get(name) if mode in LOSSY else None  # --budget: MiB, no floor search

    def prepare(model, opt) -> Prepared:
        x, y = first_batch(task, ns.seed)
        if mode == "all-state":
            bits = "bf16" if isinstance(opt, torch.optim.SGD) else 8
            opt = fxmem.low_bit_optimizer(opt, bits=bits)
            info["optimizer_state"] = f"{type(opt).__name__} (bits={bits!r})"
        f = None if fixed is not None else find_floor(model, opt, x, y, allow, ns, coupling,
                                                       micro)
        info.update(allow=list(allow), microbatch_coupling=coupling, floor=f,
                    forced_microbatches=micro)
        forced = {}
        if mode in LOSSY and name in ns.densities:
            forced.update(sparse_density=ns.densities[name], precision="bf16")
        elif mode in LOSSY and not ns.search and f is not None:
            if f["density"] is not None:
                forced["sparse_density"] = f["density"]
            if f["bf16"]:
                forced["precision"] = "bf16"
        info["forced"] = forced
        info["attempts"] = []
        tries = ([(None, int(fixed * MiB))] if fixed is not None
                 else [(m, int(m * f["floor"])) for m in ns.margins])
        for margin, budget in tries:
            module = fxmem.optimize(model, budget, optimizer=opt, allow=allow,
                                    lowering=ns.lowering, time_limit=ns.time_limit,
                                    microbatch_coupling=coupling, microbatches=micro,
                                    **forced)
            t0 = time.perf_counter()
            try:
                plan = module.plan_for(x, y)
            except fxmem.BudgetError as exc:
                info["attempts"].append({"margin": margin, "budget": budget,
                                         "error": str(exc).splitlines()[0],
                                         "seconds": time.perf_counter() - t0})
                where = "the --budget" if margin is None else f"{margin}x the floor"
                print(f"   {name}/{mode}: no plan at {where} ({budget / MiB:.2f} MiB): "
                      f"{str(exc).splitlines()[0]}", flush=True)
                continue
            info["attempts"].append({"margin": margin, "budget": budget,
                                     "seconds": time.perf_counter() - t0})
            info.update(margin=margin, budget=budget, module=module, plan=plan)
            return Prepared(module, eval_model=model, optimizer=opt)
        if f is None:
            raise fxmem.BudgetError(f"no plan at the --budget {fixed} MiB", floor=None)
        raise fxmem.BudgetError(f"no plan at margins {ns.margins} of the floor "
                                f"{f['floor']} B", floor=f["floor"])

    return prepare


def plan_summary(plan) -> dict:
    report = plan.report()
    micro = getattr(plan, "microbatch", None)
    sparsity = getattr(plan, "sparsity", None)
    precision = next((r for r in plan.provenance if r.name == "precision"), None)
    return {"predicted_peak": int(plan.predicted_peak),
            "unoptimized_peak": int(plan.unoptimized_peak),
            "microbatches": len(micro.sizes) if micro is not None else 1,
            "microbatch_sizes": sorted(set(micro.sizes)) if micro is not None else None,
            "recomputed": len(plan.record.recomputed),
            "bf16": precision is not None,
            "density": getattr(sparsity, "density", None) if sparsity is not None else None,
            "levers_used": next((ln.strip() for ln in report.splitlines()
                                 if ln.strip().startswith("levers used")), None),
            "report": report}


# ------------------------------------------------------------------------------ one run


def _steps_of(mode: str, ns, steps: int) -> int:
    """The steps a mode runs: ``steps`` when trained, else the planning step and the measured
    one (memory only)."""
    return steps if mode in ns.train_modes else MEASURE_STEP + 1


def run_mode(name: str, mode: str, ns, steps: int) -> dict:
    trained = mode in ns.train_modes
    steps = _steps_of(mode, ns, steps)
    task = make_task(name, steps, ns.quick)
    info: dict = {"task": task}
    prepare = None if mode == "eager" else planned(name, mode, ns, info)
    row = train(task, ns.seed, prepare, label=mode, measure_step=MEASURE_STEP)
    row.pop("_model")
    row.pop("_step_fn")
    row.pop("_optimizer")
    info.pop("task")
    module, plan = info.pop("module", None), info.pop("plan", None)
    row.update(info)
    row["trained"] = trained
    row["description"] = task.description
    if module is not None:
        plan = module.plan  # the plan the measured step ran
        row.update(plan_summary(plan))
        row["within_budget"] = row["measured_peak"] <= row["budget"]
        row["prediction_error_pct"] = (100.0 * (row["predicted_peak"] - row["measured_peak"])
                                       / row["measured_peak"])
    return row


# ------------------------------------------------------------------------------ report


def _mib(x) -> str:
    return "" if x is None else f"{x / MiB:.2f}"


def _metric(row: dict) -> tuple[str, float | None]:
    if "test_acc" in row:
        return "test accuracy", row["test_acc"]
    return "validation loss", row.get("val_loss")


def reductions(rows: list[dict]) -> None:
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["mode"] == "eager"
                     and b.get("status") == "ok"), None)
        if base is not None and r.get("status") == "ok" and r.get("measured_peak"):
            r["reduction"] = base["measured_peak"] / r["measured_peak"]
            if r.get("predicted_peak"):
                r["predicted_reduction"] = base["measured_peak"] / r["predicted_peak"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("wrn", "lm") if any(r["model"] == n for r in rows)]
    if not names:
        return
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8), squeeze=False)
    for j, name in enumerate(names):
        ok = [r for r in rows if r["model"] == name and r.get("status") == "ok"]
        ax = axes[0][j]
        labels = [r["mode"] for r in ok]
        ax.bar(labels, [r["measured_peak"] / MiB for r in ok], color="tab:blue",
               label="measured")
        for i, r in enumerate(ok):
            if r.get("budget"):
                ax.plot([i - 0.4, i + 0.4], [r["budget"] / MiB] * 2, "k--",
                        label="budget" if i == 1 else None)
            ax.text(i, r["measured_peak"] / MiB, f"{r['measured_peak'] / MiB:.1f} MiB"
                    + (f"\n{r['reduction']:.1f}x" if r.get("reduction") else ""),
                    ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("measured peak of one training step (MiB, log)")
        ax.set_title(name)
        ax.legend()
        ax = axes[1][j]
        for r in ok:
            ax.plot(r["train_losses"], label=r["mode"])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(meta: dict, rows: list[dict], out: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    reductions(rows)
    (RESULTS / f"{out}.json").write_text(json.dumps({**meta, "runs": rows}, indent=1,
                                                    default=str) + "\n")
    md = ["# The technical report's headline, measured (bench/reproduction.py)", "",
          f"Command: `{meta['command']}`", "",
          f"{meta['date']}; torch {meta['torch']}; Python {meta['python']}; CPU: {meta['cpu']} "
          f"({meta['threads']} torch threads; the machine's 2 cores are shared with other jobs, "
          f"so times are indicative); lowering `{meta['lowering']}`; seed {meta['seed']}; "
          f"budgets at {meta['margins'][0]}x the floor (then {meta['margins'][1:]} if no plan); "
          f"total wall time {meta.get('total_wall_s', 0) / 60:.1f} min."
          + ("".join(f" Forced in the lossy modes of {n}: k={k} microbatches (BatchNorm over "
                     f"batch/k samples)." for n, k in meta.get("microbatches", {}).items()))
          + "".join(f" The lossy modes of {n} planned at a budget of {b} MiB (no floor search)."
                    for n, b in meta.get("budgets_mib", {}).items())
          + "".join(f" Forced in the lossy modes of {n}: density {d} with bf16 compute."
                    for n, d in meta.get("densities", {}).items()),
          ""]
    for res in meta.get("resumed", []):
        md += [f"Resumed: the runs {', '.join(res['runs'])} are those of `{res['command']}` "
               f"({res['date']}).", ""]
    md += ["Peaks: step 1 of each training run (after the step that plans and compiles) measured "
          "with `fxmem.measure_memory` (the bytes the model, batch and optimizer hold at its "
          "start plus the allocator's events through forward, backward, `opt.step()` and "
          "`opt.zero_grad`). Reduction = eager fp32's measured peak / the mode's measured peak. "
          "`exact` = `allow=(\"recompute\", \"microbatch\")`; `all` = `allow=(\"recompute\", "
          "\"microbatch\", \"precision\", \"sparse\")`; `all-state` = `all` with "
          "`opt = fxmem.low_bit_optimizer(opt, bits=8)` (AdamW; `bits='bf16'` for SGD) before "
          "planning.", ""]
    names = [n for n in ("wrn", "lm") if any(r["model"] == n for r in rows)]
    md += ["## Memory", "",
           "| workload | mode | budget MiB | predicted MiB | measured MiB | within budget | "
           "prediction error | reduction (measured) | target | plan |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        for r in (r for r in rows if r["model"] == name):
            if r.get("status") != "ok":
                md.append(f"| {name} | {r['mode']} | | | **failed**: {r.get('error', '?')} "
                          f"| | | | | |")
                continue
            target = (f">= {TARGETS[name][0]}x (aim {TARGETS[name][1]}x)"
                      if r["mode"] != "eager" and name in TARGETS else "")
            red = ("1.0x" if r["mode"] == "eager" else f"**{r['reduction']:.1f}x**"
                   if r.get("reduction") else "(no eager run)")
            plan = "eager PyTorch, fp32"
            if r["mode"] != "eager":
                parts = [f"k={r['microbatches']}" + (f" (sizes {r['microbatch_sizes']})"
                                                     if r["microbatches"] > 1 else ""),
                         f"{r['recomputed']} ops recomputed",
                         "bf16 compute" if r["bf16"] else "fp32",
                         f"density {r['density']}" if r.get("density") else "dense"]
                if r.get("microbatch_coupling") == "per-microbatch":
                    parts.append("BatchNorm per microbatch")
                if r.get("optimizer_state"):
                    parts.append("optimizer " + r["optimizer_state"])
                if r.get("forced"):
                    parts.append("forced " + ", ".join(f"{k}={v!r}"
                                                       for k, v in r["forced"].items()))
                plan = "; ".join(parts)
            within = ("" if "within_budget" not in r
                      else "yes" if r["within_budget"] else "**NO**")
            error = (f"{r['prediction_error_pct']:+.2f}%" if "prediction_error_pct" in r
                     else "")
            md.append(f"| {name} | {r['mode']} | {_mib(r.get('budget'))} | "
                      f"{_mib(r.get('predicted_peak'))} | {_mib(r['measured_peak'])} | "
                      f"{within} | {error} | {red} | {target} | {plan} |")
    md.append("")
    md += ["Floors (the BudgetError of a 1-byte budget on the first batch):", ""]
    for r in rows:
        f = r.get("floor")
        if not f:
            continue
        held = ", ".join(f"{k} {_mib(v)}" for k, v in sorted(f["holders"].items(),
                                                            key=lambda kv: -kv[1]) if v)
        md.append(f"- {r['model']}/{r['mode']}: floor {_mib(f['floor'])} MiB (fxmem's "
                  f"unoptimised peak {_mib(f['unoptimized'])} MiB; found in {f['seconds']:.0f} s)"
                  f"; held by {held}")
        for line in f["message"].splitlines()[1:]:
            if line.strip() and not line.startswith("  - ") and "... and" not in line:
                md.append(f"  - {line.strip()}")
        for a in r.get("attempts", []):
            if "error" in a:
                md.append(f"  - no plan at {a['margin']}x ({_mib(a['budget'])} MiB): "
                          f"{a['error']}")
    md.append("")
    md += ["## Training on real data (same seed, same batches, same steps)", ""]
    for name in names:
        ok = [r for r in rows if r["model"] == name and r.get("status") == "ok"]
        if not ok:
            continue
        label, _ = _metric(ok[0])
        md += [f"### {name}", "", ok[0]["description"], "",
               f"| mode | steps | {label} | vs eager | final train loss | median step s | "
               f"first step s (plans, compiles) | planning s | wall s |",
               "|---|---|---|---|---|---|---|---|---|"]
        base = next((r for r in ok if r["mode"] == "eager"), None)
        for r in ok:
            if not r.get("trained", True):
                md.append(f"| {r['mode']} | {r['steps']} | not trained (memory only: "
                          f"`--train-modes`) | | | | {r['first_step_s']:.1f} | "
                          f"{r.get('prepare_s', 0):.0f} | {r['wall_s']:.0f} |")
                continue
            _, value = _metric(r)
            diff = ""
            if base is not None and r is not base:
                _, b = _metric(base)
                diff = (f"{value - b:+.2f} points" if label == "test accuracy"
                        else f"{value - b:+.4f} ({100 * (value - b) / b:+.2f}%)")
            shown = f"{value:.2f}%" if label == "test accuracy" else f"{value:.4f}"
            md.append(f"| {r['mode']} | {r['steps']} | {shown} | {diff} | "
                      f"{r['train_loss_last']:.4f} | {r['median_step_s']:.2f} | "
                      f"{r['first_step_s']:.1f} | {r.get('prepare_s', 0):.0f} | "
                      f"{r['wall_s']:.0f} |")
        md.append("")
    md += [f"![peaks and losses]({out}.png)", ""]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        md += ["## Failures", ""]
        for r in failed:
            md += [f"### {r['model']}/{r['mode']}", "", "```",
                   r.get("traceback", "").strip(), "```", ""]
    if meta.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    (RESULTS / f"{out}.md").write_text("\n".join(md))
    try:
        plot(rows, RESULTS / f"{out}.png")
    except Exception as exc:  # noqa: BLE001 - the tables matter more than the figure
        print(f"!! plot failed: {exc}", flush=True)


# ------------------------------------------------------------------------------ main


def _pairs(text: str, kind) -> dict:
    """``"wrn=16,lm=8"`` -> ``{"wrn": 16, "lm": 8}``."""
    return {n: kind(v) for n, v in (kv.split("=") for kv in text.split(",") if kv)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="wrn,lm")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--wrn-steps", type=int, default=None)
    p.add_argument("--lm-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--margins", default="1.03,1.05,1.1,1.25",
                   help="budgets tried, as multiples of the floor, in order")
    p.add_argument("--lowering", default="inductor", choices=("inductor", "eager"))
    p.add_argument("--time-limit", type=float, default=5.0, help="seconds per solve")
    p.add_argument("--search", action="store_true",
                   help="with every lever, let fxmem search the densities and precision at the "
                        "budget instead of forcing those that reached the floor")
    p.add_argument("--train-modes", default=None,
                   help="modes trained for the steps (default: every mode); the others run "
                        "the planning step and the measured one only")
    p.add_argument("--all-allow", default=",".join(ALL),
                   help="the levers of the 'all' mode (default every lever)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs of the results JSON that finished (same workload, mode "
                        "and steps; those of workloads or modes not run are kept as they are) "
                        "and run only the others")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny models, 2 steps")
    p.add_argument("--out", default=None,
                   help="results file stem (default reproduction; reproduction_quick with --quick)")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section")
    p.add_argument("--microbatches", default="", metavar="NAME=K,...",
                   help="force k microbatches in the lossy modes of these workloads (e.g. "
                        "wrn=16: BatchNorm over 8 of 128 samples); default: the planner's k")
    p.add_argument("--budget", default="", metavar="NAME=MIB,...",
                   help="plan the lossy modes of these workloads at this budget in MiB (e.g. "
                        "wrn=7.99, 485.29 / 60.7) instead of a margin over the floor (not "
                        "searched then)")
    p.add_argument("--density", default="", metavar="NAME=D,...",
                   help="force this density (and bf16 compute) in the lossy modes of these "
                        "workloads instead of the floor's")
    ns = p.parse_args(argv)
    ns.microbatches = _pairs(ns.microbatches, int)
    ns.budgets = _pairs(ns.budget, float)
    ns.densities = _pairs(ns.density, float)
    ns.margins = [float(m) for m in ns.margins.split(",")]
    ns.all_allow = [a for a in ns.all_allow.split(",") if a]
    names = [n for n in ns.workloads.split(",") if n]
    modes = [m for m in ns.modes.split(",") if m]
    if set(names) - {"wrn", "lm"} or set(modes) - set(MODES):
        p.error(f"workloads from wrn,lm and modes from {','.join(MODES)}")
    ns.train_modes = modes if ns.train_modes is None else [
        m for m in ns.train_modes.split(",") if m]
    out = ns.out or ("reproduction_quick" if ns.quick else "reproduction")
    steps = dict(QUICK_STEPS if ns.quick else DEFAULT_STEPS)
    if ns.wrn_steps is not None:
        steps["wrn"] = ns.wrn_steps
    if ns.lm_steps is not None:
        steps["lm"] = ns.lm_steps
    if min(steps[n] for n in names) <= MEASURE_STEP:
        p.error(f"each workload needs more than {MEASURE_STEP} steps (step {MEASURE_STEP} is "
                "measured)")
    meta = {"command": "python " + " ".join(["bench/reproduction.py",
                                             *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "seed": ns.seed, "steps": steps,
            "margins": ns.margins, "lowering": ns.lowering, "time_limit": ns.time_limit,
            "search": ns.search, "microbatches": ns.microbatches, "budgets_mib": ns.budgets,
            "densities": ns.densities, "notes": ns.note}
    rows: list[dict] = []
    done: set = set()
    if ns.resume and (RESULTS / f"{out}.json").exists():
        old = json.loads((RESULTS / f"{out}.json").read_text())
        rows = [r for r in old["runs"] if r.get("status") == "ok" and (
            r["model"] not in names or r["mode"] not in modes
            or r.get("steps") == _steps_of(r["mode"], ns, steps[r["model"]]))]
        done = {(r["model"], r["mode"]) for r in rows}
        meta["resumed"] = [{"command": old.get("command"), "date": old.get("date"),
                            "runs": sorted(f"{m}/{k}" for m, k in done)}]
        meta["resumed"] += old.get("resumed", [])
    t0 = time.perf_counter()
    for name in names:
        for mode in modes:
            if (name, mode) in done:
                continue
            print(f"== {name}/{mode}", flush=True)
            try:
                row = run_mode(name, mode, ns, steps[name])
            except Exception as exc:  # noqa: BLE001 - recorded, the other runs go on
                first = str(exc).splitlines()[0][:300] if str(exc) else ""
                row = {"model": name, "mode": mode, "status": "failed",
                       "error": f"{type(exc).__name__}: {first}",
                       "traceback": traceback.format_exc()[-6000:]}
                print(f"!! {name}/{mode} failed: {row['error']}", flush=True)
            else:
                print(f"-- {name}/{mode}: measured {_mib(row['measured_peak'])} MiB"
                      + (f", budget {_mib(row['budget'])}, predicted "
                         f"{_mib(row['predicted_peak'])}" if row.get("budget") else "")
                      + f"; {row.get('test_acc', row.get('val_loss'))}; "
                      f"{row['wall_s']:.0f} s", flush=True)
            rows.append(row)
            meta["total_wall_s"] = time.perf_counter() - t0
            write(meta, rows, out)
    print(f"wrote {RESULTS / (out + '.md')} ({meta['total_wall_s'] / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
