"""The joint planner measured (issue 20, "Must show" 2 and 3): a budget sweep, and the Pareto front.

One process, one workload: the bench ``gpt_decoder`` (:func:`bench.workloads.gpt_decoder`) at a
small size (``--size``, default 2 layers, d_model 256, 4 heads, vocabulary 2048, batch 2 x 128
tokens), the step as :func:`bench.precision.step` runs it (forward, the loss, backward; no
optimizer), every lever allowed: ``ALL = ("recompute", "microbatch", "precision", "sparse")``.

1. **Floor and top.** The all-lever floor is the :class:`fxmem.BudgetError`'s ``floor`` for a
   1-byte budget (``fxmem.optimize(model, 1, allow=ALL).plan_for``: planned, nothing run). The
   top is the eager fp32 step's measured peak (the unoptimised step).
2. **Sweep (must show 2).** ``--budgets`` budgets from ``--margin`` x the floor (a time-limited
   solve may miss the floor itself) to the top, evenly spaced. At each budget:

   - ``optimize``: what a user gets, ``fxmem.optimize(model, budget, allow=ALL)`` on a fresh
     model (same seed), its first call planning and compiling (its fixed ladder: the exact levers,
     then bf16 compute, then sparse weights from density 0.5 down);
   - ``joint``: :func:`fxmem.planning.joint.explore` at the same budget (``floors=False``,
     ``--densities``), its chosen point built with ``fxmem.optimize(..., **e.optimize_kwargs())``
     (its settings forced, recomputation planned on top). When its settings (k, precision,
     density) equal the ``optimize`` plan's, the ``optimize`` module stands for it (not built
     twice).

3. **Pareto front (must show 3).** From the exploration at ``--front-budget`` (an index into the
   sweep; default the middle budget), up to ``--front-points`` points of the front, spread over its
   predicted times; when the front has fewer than 6 points, off-front points are added (said in the
   results). Each point is built with its settings forced, at the exploration's budget when it
   fits it and with no limit when not (as :func:`~fxmem.planning.joint.explore` planned it).

**Measured.** Every module built is called twice (plan + compile, warm-up), then its peak is
measured with :func:`fxmem.measure_memory` (bytes the model and inputs hold at the start plus the
allocator's events; gradients set to None before) and its step time in ``--rounds`` rounds that
run every module once each, in a rotated order (paired samples: the ratio of two modules' times
within a round cancels most of the machine's load drift). Time = the median of the rounds.
Predicted time: :func:`fxmem.planning.joint.plan_seconds` (:mod:`fxmem.cost.step`: matrix
products measured once per signature in the process, pointwise ops priced as fused, the
microbatch loop's costs). ``--prefer``: explore's choice, the fastest point that fits
(``time``, default) or exact points first (``exact``); ``optimize``'s ladder is exact-first.

**Does time rise with the budget?** For consecutive budgets the per-round ratio of the larger
budget's time to the smaller's: a rise is flagged when the median ratio is above 1 and a sign
test over the rounds gives p < 0.05 (not noise), and it is put down to the policy when the larger
budget's plan is less lossy and predicted slower (lossy levers only as far as the budget needs), to
the planner when the predicted time rose too, to the cost model when only the measured one did.

Writes ``bench/results/<out>.{md,json,png}`` (default ``joint_sweep``).

    python bench/joint_sweep.py      # 39 min (20 min of CPU) on 2 cores shared at load 5-9
    python bench/joint_sweep.py --budgets 2 --front-points 3 --rounds 3 --size tiny \
        --densities 0.05 --out smoke                  # a smoke run: 11 min on the same machine
    python bench/joint_sweep.py --rewrite             # the .md and .png again from the .json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from bench.environment import cpu_name  # noqa: E402
from bench.precision import step  # noqa: E402
from bench.reproduction import plan_summary  # noqa: E402
from bench.workloads import gpt_decoder  # noqa: E402
from fxmem.planning.joint import (JointExploration, JointPoint, explore,  # noqa: E402
                                  plan_seconds)

RESULTS = ROOT / "bench" / "results"
MiB = 2**20
ALL = ("recompute", "microbatch", "precision", "sparse")
NO_LIMIT = 2**62  # explore's budget for a point that does not fit: nothing recomputed
SIZES = {
    "small": dict(batch=2, seq=128, n_layer=2, d_model=256, n_head=4, vocab_size=2048),
    "tiny": dict(batch=2, seq=32, n_layer=1, d_model=64, n_head=2, vocab_size=256),
}
_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------ analysis helpers


def settings(k: int, bf16: bool, density: float | None) -> tuple:
    return (int(k), bool(bf16), None if density is None else round(float(density), 6))


def point_settings(p: JointPoint) -> tuple:
    return settings(p.microbatches, p.precision != "fp32", p.density)


def plan_settings(summary: dict) -> tuple:
    return settings(summary["microbatches"], summary["bf16"], summary.get("density"))


def describe(s: tuple, recomputed: int | None = None) -> str:
    k, bf16, density = s
    parts = ["whole batch" if k == 1 else f"k={k}"]
    if recomputed is not None:
        parts.append(f"{recomputed} recomputed")
    parts.append("bf16" if bf16 else "fp32")
    parts.append("dense" if density is None else f"density {density:g}")
    return ", ".join(parts)


def lossiness(s) -> tuple:
    """The ladder's order of a plan's settings, as :attr:`JointPoint.lossiness`."""
    _, bf16, density = s
    return (0.0 if density is None else 1.0 - density, bool(bf16))


def ranks(xs: list[float]) -> list[float]:
    """Average ranks (1-based), ties sharing the mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for m in range(i, j + 1):
            out[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); nan for fewer than 2 values."""
    if len(xs) < 2:
        return math.nan
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else math.nan


def discordant(labels: list[str], predicted: list[float], measured: list[float]) -> list[dict]:
    """The pairs the two orders disagree on (predicted faster, measured slower)."""
    out = []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            dp, dm = predicted[j] - predicted[i], measured[j] - measured[i]
            if dp * dm < 0:
                slow, fast = (j, i) if dp > 0 else (i, j)  # by the prediction
                out.append({"predicted_faster": labels[fast], "predicted_slower": labels[slow],
                            "predicted_ratio": predicted[slow] / predicted[fast],
                            "measured_ratio": measured[slow] / measured[fast]})
    return out


def sign_test(wins: int, n: int) -> float:
    """One-sided p of at least ``wins`` successes in ``n`` fair coin flips."""
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n if n else 1.0


def violations(rows: list[dict]) -> list[dict]:
    """Sweep rows whose measured peak (of either plan) is over the budget."""
    out = []
    for r in rows:
        for who in ("optimize", "joint"):
            if who == "joint" and r.get("joint_same_as_optimize"):
                continue  # the same module as optimize's: counted once
            m = r.get(who) or {}
            if m.get("measured_peak") is not None and m["measured_peak"] > r["budget"]:
                out.append({"budget": r["budget"], "plan": who,
                            "measured_peak": m["measured_peak"],
                            "over": m["measured_peak"] - r["budget"]})
    return out


def rises(rows: list[dict], who: str, alpha: float = 0.05) -> list[dict]:
    """For consecutive budgets (ascending) with ``who``'s plan timed at both: the step-time
    change, flagged ``rise`` when the median per-round ratio (larger budget / smaller) is above 1
    with a sign-test p below ``alpha``; ``cause``: ``planner`` when the predicted time rose too,
    ``cost model`` when only the measured time rose, ``noise`` when the rise is not significant,
    ``re-plan`` when the exploration predicted a fall but the joint's choices, planned again with
    their settings forced, predict a rise,
    ``policy`` when the larger budget's plan is less lossy and predicted slower (lossy levers are
    used only as far as the budget needs, even where they are faster)."""
    timed = [r for r in sorted(rows, key=lambda r: r["budget"])
             if (r.get(who) or {}).get("seconds")]
    out = []
    for lo, hi in zip(timed, timed[1:]):
        a, b = lo[who], hi[who]
        n = min(len(a["seconds"]), len(b["seconds"]))
        ratios = [b["seconds"][i] / a["seconds"][i] for i in range(n)]
        ratio = statistics.median(ratios)
        p = sign_test(sum(x > 1 for x in ratios), n)
        explored = [None, None]  # the exploration's predicted times of the joint's choices
        if who == "joint" and lo.get("joint_point") and hi.get("joint_point"):
            explored = [lo["joint_point"]["seconds"], hi["joint_point"]["seconds"]]
        same = a.get("settings") == b.get("settings") and a.get("recomputed") == b.get(
            "recomputed")
        rise = ratio > 1 and p < alpha
        rose = (explored[1] > explored[0] * 1.0001 if explored[0] is not None
                else b["predicted_seconds"] > a["predicted_seconds"] * 1.0001)  # as planned
        cause = None
        if ratio > 1:
            if not rise:
                cause = "noise"
            elif same:
                cause = "noise (the same plan)"
            elif lossiness(b["settings"]) < lossiness(a["settings"]) and rose:
                cause = "policy (a slower, less lossy plan once the budget allows it)"
            elif lossiness(b["settings"]) < lossiness(a["settings"]):
                cause = ("cost model (predicted faster; the plan is also less lossy, which "
                         "optimize's ladder takes whatever the time)")
            elif explored[0] is not None and explored[1] > explored[0] * 1.0001:
                cause = "planner (the exploration's predicted time rose too)"
            elif b["predicted_seconds"] > a["predicted_seconds"] * 1.0001:
                cause = ("re-plan (the exploration predicted a fall; the same settings planned "
                         "again predict a rise)" if explored[0] is not None else "planner")
            else:
                cause = "cost model"
        out.append({"from": lo["budget"], "to": hi["budget"], "median_ratio": ratio,
                    "p": p, "rounds": n, "rise": rise, "cause": cause, "same_plan": same,
                    "predicted_ratio": b["predicted_seconds"] / a["predicted_seconds"],
                    "explored_ratio": (explored[1] / explored[0] if explored[0] is not None
                                       else None)})
    return out


def pick_front(e: JointExploration, n: int) -> tuple[list[JointPoint], bool]:
    """Up to ``n`` front points spread over predicted time (the chosen always in), topped up with
    off-front points (nearest the front's times first) to at least min(6, #points); returns the
    points and whether off-front points were added."""
    front = sorted(e.front, key=lambda p: p.seconds)
    if len(front) <= n:
        picked = list(front)
    else:
        idx = sorted({round(i * (len(front) - 1) / (n - 1)) for i in range(n)})
        picked = [front[i] for i in idx]
        if e.chosen is not None and e.chosen not in picked:
            picked[-1 if len(picked) > 1 else 0] = e.chosen
    added = False  # whether off-front points were added
    want = min(6, len(e.points))
    if len(picked) < want:  # the rest of the front first, then the off-front points
        rest = sorted((p for p in e.points if p not in picked),
                      key=lambda p: (p not in e.front, p.seconds))
        picked += rest[:want - len(picked)]
        added = any(p not in e.front for p in picked)
    return sorted(picked, key=lambda p: p.seconds), added


# ------------------------------------------------------------------------------ building, measuring


class Built:
    """One fxmem module on a fresh copy of the workload, compiled and warmed up."""

    def __init__(self, label: str, size: dict, budget: int, kwargs: dict, time_limit: float):
        self.label, self.budget = label, budget
        self.w = gpt_decoder(**size)
        self.model = self.w["model"]
        t0 = time.perf_counter()
        self.module = fxmem.optimize(self.model, budget, time_limit=time_limit, **kwargs)
        self.error = None
        try:
            for _ in range(2):  # plan + compile, then a warm-up step
                self.run()
        except fxmem.BudgetError as exc:
            self.error = f"BudgetError: {str(exc).splitlines()[0]}"
        except Exception as exc:  # recorded; the others still run
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            traceback.print_exc()
        self.build_seconds = time.perf_counter() - t0
        self.seconds: list[float] = []
        self.measured_peak: int | None = None
        self.summary = None
        if self.error is None:
            plan = self.module.plan
            self.summary = plan_summary(plan)
            self.summary.pop("report")
            self.summary["predicted_seconds"] = plan_seconds(plan)
            choice = getattr(getattr(self.module, "_sparse", None), "choice", None)
            if choice is not None:  # the density asked for (the summary's is the one reached)
                self.summary["density_reached"] = self.summary["density"]
                self.summary["density"] = choice.density

    def run(self) -> float:
        self.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step(self.module, self.w)
        return time.perf_counter() - t0

    def measure(self) -> None:
        self.model.zero_grad(set_to_none=True)
        gc.collect()
        mem = fxmem.measure_memory(lambda: step(self.module, self.w), device="cpu",
                                   baseline=[self.model, self.w["args"], self.w["kwargs"]])
        self.model.zero_grad(set_to_none=True)
        self.measured_peak = int(mem.peak)

    def record(self) -> dict:
        if self.error is not None:
            return {"label": self.label, "error": self.error,
                    "build_seconds": self.build_seconds}
        s = self.summary
        return {"label": self.label, "settings": plan_settings(s), "recomputed": s["recomputed"],
                "levers": describe(plan_settings(s), s["recomputed"]),
                "predicted_peak": s["predicted_peak"], "measured_peak": self.measured_peak,
                "within_budget": (self.measured_peak <= self.budget
                                  if self.measured_peak is not None else None),
                "predicted_seconds": s["predicted_seconds"], "seconds": self.seconds,
                "median_seconds": statistics.median(self.seconds) if self.seconds else None,
                "build_seconds": self.build_seconds, "budget": self.budget}


def time_interleaved(mods: list[Built], rounds: int) -> None:
    """``rounds`` rounds; each runs every module once, the order rotated per round."""
    live = [m for m in mods if m.error is None]
    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for m in order:
            m.seconds.append(m.run())


def eager_peak(size: dict) -> int:
    w = gpt_decoder(**size)
    step(w["model"], w)  # warm-up
    w["model"].zero_grad(set_to_none=True)
    gc.collect()
    mem = fxmem.measure_memory(lambda: step(w["model"], w), device="cpu",
                               baseline=[w["model"], w["args"], w["kwargs"]])
    return int(mem.peak)


def all_lever_floor(size: dict, time_limit: float) -> dict:
    w = gpt_decoder(**size)
    t0 = time.perf_counter()
    try:
        fxmem.optimize(w["model"], 1, allow=ALL, time_limit=time_limit).plan_for(*w["args"])
    except fxmem.BudgetError as exc:
        return {"floor": int(exc.floor), "unoptimized_predicted": exc.unoptimized,
                "message": str(exc), "seconds": time.perf_counter() - t0}
    raise AssertionError("a 1-byte budget was met")


# ------------------------------------------------------------------------------ the run


def run(ns) -> dict:
    size = SIZES[ns.size]
    torch.set_num_threads(ns.threads)
    res: dict = {"size": size, "size_name": ns.size, "allow": list(ALL)}
    say(f"gpt_decoder {size}: all-lever floor")
    res["floor"] = f = all_lever_floor(size, ns.time_limit)
    res["eager_peak"] = top = eager_peak(size)
    say(f"floor {f['floor'] / MiB:.2f} MiB ({f['seconds']:.0f} s), eager measured peak "
        f"{top / MiB:.2f} MiB")
    low = int(ns.margin * f["floor"])
    budgets = [low + round(i * (top - low) / (ns.budgets - 1)) for i in range(ns.budgets)]
    res["budgets"] = budgets
    res["explorations"] = []
    rows, mods = [], []
    fb = ns.front_budget if ns.front_budget is not None else len(budgets) // 2
    front_e = None
    for i, b in enumerate(budgets):
        say(f"budget {i + 1}/{len(budgets)}: {b / MiB:.2f} MiB")
        row: dict = {"budget": b}
        opt = Built(f"optimize@{b / MiB:.2f}", size, b, dict(allow=ALL), ns.time_limit)
        mods.append(opt)
        row["_optimize"] = opt
        what = opt.error or describe(plan_settings(opt.summary), opt.summary["recomputed"])
        say(f"  optimize: {what} ({opt.build_seconds:.0f} s)")
        w = gpt_decoder(**size)
        try:
            e = explore(w["model"], *w["args"], budget=b, allow=ALL, time_limit=ns.time_limit,
                        progress=False, floors=False, densities=ns.densities, prefer=ns.prefer)
        except Exception as exc:  # recorded; the sweep goes on
            traceback.print_exc()
            row.update(joint_error=f"explore: {type(exc).__name__}: {exc}", joint_point=None,
                       _joint=None)
            rows.append(row)
            continue
        del w
        say(f"  explore: {len(e.points)} points in {e.seconds:.0f} s; chosen "
            f"{e.chosen.levers if e.chosen else None}")
        res["explorations"].append(exploration_record(e))
        if i == fb:
            front_e = e
        row["joint_point"] = point_record(e.chosen) if e.chosen else None
        if e.chosen is None:
            row["_joint"] = None
        elif opt.error is None and point_settings(e.chosen) == plan_settings(opt.summary):
            row["_joint"] = opt
            row["joint_same_as_optimize"] = True
        else:
            jm = Built(f"joint@{b / MiB:.2f}", size, b, e.optimize_kwargs(), ns.time_limit)
            mods.append(jm)
            row["_joint"] = jm
            row["joint_same_as_optimize"] = False
            say(f"  joint's choice built: {jm.error or jm.summary['predicted_peak'] / MiB}")
        rows.append(row)
    front_mods = []
    if front_e is not None:
        picked, added = pick_front(front_e, ns.front_points)
        res["front"] = {"budget": front_e.budget, "front_size": len(front_e.front),
                        "points_planned": len(front_e.points), "off_front_added": added}
        for n, p in enumerate(picked):
            kw = front_e.optimize_kwargs(p)
            m = Built(f"#{n} {p.levers}", size, front_e.budget if p.fits else NO_LIMIT, kw,
                      ns.time_limit)
            m.point = p
            mods.append(m)
            front_mods.append(m)
            say(f"  front point {p.levers}: {m.error or 'built'} ({m.build_seconds:.0f} s)")
    say(f"measuring {len(mods)} modules")
    for m in mods:
        if m.error is None:
            try:
                m.measure()
            except Exception as exc:
                m.error = f"measure: {type(exc).__name__}: {exc}"
    say(f"timing: {ns.rounds} rounds")
    time_interleaved(mods, ns.rounds)
    for row in rows:
        row["optimize"] = row.pop("_optimize").record()
        j = row.pop("_joint")
        row["joint"] = j.record() if j is not None else None
    res["sweep"] = rows
    res["violations"] = violations(rows)
    res["rises"] = {who: rises(rows, who) for who in ("optimize", "joint")}
    if front_mods:
        pts = []
        for m in front_mods:
            rec = m.record()
            rec["point"] = point_record(m.point)
            rec["on_front"] = m.point in front_e.front
            rec["chosen"] = m.point is front_e.chosen
            pts.append(rec)
        res["front"]["points"] = pts
        ok = [r for r in pts if r.get("median_seconds")]
        pred = [r["point"]["seconds"] for r in ok]
        meas = [r["median_seconds"] for r in ok]
        labels = [r["label"] for r in ok]
        res["front"].update(
            spearman_time=spearman(pred, meas),
            spearman_time_rebuilt=spearman([r["predicted_seconds"] for r in ok], meas),
            spearman_peak=spearman([r["point"]["peak"] for r in ok],
                                   [r["measured_peak"] for r in ok]),
            discordant=discordant(labels, pred, meas),
            pairs=len(ok) * (len(ok) - 1) // 2)
    return res


def point_record(p: JointPoint) -> dict:
    return {"levers": p.levers, "microbatches": p.microbatches, "precision": p.precision,
            "density": p.density, "peak": p.peak, "seconds": p.seconds, "fits": p.fits,
            "recomputed": p.recomputed, "exact": p.exact}


def exploration_record(e: JointExploration) -> dict:
    return {"budget": e.budget, "seconds": e.seconds, "skipped": list(e.skipped),
            "chosen": point_record(e.chosen) if e.chosen else None,
            "points": [dict(point_record(p), front=p in e.front) for p in e.points]}


# ------------------------------------------------------------------------------ report


def _mib(x) -> str:
    return "-" if x is None else f"{x / MiB:.2f}"


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def verdicts(res: dict) -> dict:
    v = {}
    measured = [r for r in res["sweep"] for who in ("optimize", "joint")
                if (r.get(who) or {}).get("measured_peak") is not None]
    failed = [(r["budget"], who) for r in res["sweep"] for who in ("optimize", "joint")
              if (r.get(who) or {}).get("error")]
    v["peak_within"] = bool(measured) and not res["violations"] and not failed
    v["peak_within_where_planned"] = bool(measured) and not res["violations"]
    v["budgets_without_plan"] = failed
    for who in ("optimize", "joint"):
        v[f"time_no_rise_{who}"] = not any(x["rise"] for x in res["rises"][who])
        v[f"time_no_rise_strict_{who}"] = not any(x["median_ratio"] > 1
                                                  for x in res["rises"][who])
    fr = res.get("front")
    if fr and fr.get("points"):
        v["front_ranking_agrees"] = not fr["discordant"] and len(
            [p for p in fr["points"] if p.get("median_seconds")]) >= 6
    return v


def _distinct_measured(rows: list[dict]) -> int:
    return sum(1 for r in rows for w in ("optimize", "joint")
               if (r.get(w) or {}).get("measured_peak") is not None
               and not (w == "joint" and r.get("joint_same_as_optimize")))


def markdown(meta: dict, res: dict) -> str:
    f = res["floor"]
    v = verdicts(res)
    md = ["# The joint planner measured: budget sweep and Pareto front (bench/joint_sweep.py)", "",
          f"Command: `{meta['command']}`", "",
          f"{meta['date']}; torch {meta['torch']}; Python {meta['python']}; CPU: {meta['cpu']} "
          f"({meta['threads']} torch thread(s); the machine's 2 cores are shared with other jobs: "
          f"times are paired per round to cancel load drift); lowering Inductor; solver time "
          f"limit {meta['time_limit']} s; explore's densities {meta['densities']}, its choice "
          f"`prefer={meta.get('prefer', 'exact')!r}`; total wall "
          f"time {meta['total_seconds'] / 60:.1f} min.", "",
          f"Workload: bench `gpt_decoder` at `{res['size']}` (dropout 0.1, tied embeddings), "
          f"step = forward + loss + backward (no optimizer), `allow={tuple(res['allow'])}`.", "",
          f"All-lever floor (`BudgetError.floor` of a 1-byte budget): **{_mib(f['floor'])} MiB** "
          f"({f['floor']} B; planned in {f['seconds']:.0f} s). Eager fp32 step, measured peak "
          f"(the unoptimised peak, the sweep's top): **{_mib(res['eager_peak'])} MiB**.", "",
          "```", f["message"].strip(), "```", ""]
    md += ["## Verdicts", ""]
    md.append(f"- Measured peak at or under the budget at every budget (both plans): "
              f"**{'yes' if v['peak_within'] else 'NO'}**: measured over the budget: "
              f"{len(res['violations'])} of {_distinct_measured(res['sweep'])} "
              f"distinct plans measured"
              + (" (" + "; ".join(f"{x['plan']} at {_mib(x['budget'])} MiB: "
                                  f"{_mib(x['measured_peak'])} MiB" for x in res["violations"])
                 + ")" if res["violations"] else "")
              + (f"; no plan made (BudgetError or failure) at: "
                 + ", ".join(f"{w} at {_mib(b)} MiB" for b, w in v["budgets_without_plan"])
                 if v["budgets_without_plan"] else ""))
    for who, name in (("optimize", "`fxmem.optimize` (the user's route)"),
                      ("joint", "the joint planner's choice (`explore`)")):
        flagged = [x for x in res["rises"][who] if x["median_ratio"] > 1]
        said = ("NO" if not v[f"time_no_rise_{who}"] else "yes" if not flagged
                else "not shown: the medians rose, within the noise")
        md.append(f"- {name}: measured step time does not rise as the budget grows: "
                  f"**{said}** (significant rises: "
                  f"{sum(x['rise'] for x in res['rises'][who])}; any rise of the medians, "
                  f"significant or not: {len(flagged)}"
                  + ("; " + "; ".join(f"{_mib(x['from'])} -> {_mib(x['to'])} MiB: x"
                                      f"{x['median_ratio']:.3f} (p={x['p']:.3g}, predicted x"
                                      f"{x['predicted_ratio']:.3f}"
                                      + (f", explored x{x['explored_ratio']:.3f}"
                                         if x.get("explored_ratio") else "")
                                      + f", cause: {x['cause']})"
                                      for x in flagged) if flagged else "") + ")")
    if "front_ranking_agrees" in v:
        fr = res["front"]
        md.append(f"- Pareto front, predicted against measured step time on "
                  f"{len(fr['points'])} points: ranking agrees: "
                  f"**{'yes' if v['front_ranking_agrees'] else 'NO'}** (Spearman "
                  f"{fr['spearman_time']:.3f}; {len(fr['discordant'])} of {fr['pairs']} pairs "
                  f"discordant)")
    md += ["", "## Sweep (must show 2)", "",
           "Per budget: `optimize` = `fxmem.optimize(model, budget, allow=ALL)`; `joint` = "
           "`explore`'s chosen point built with its settings forced (\"same\": the same settings "
           "as `optimize`'s, the same module). Times: median over the rounds (ms); ratio = the "
           "median per-round ratio to the previous budget's time.", "",
           "| budget MiB | plan | levers | predicted MiB | measured MiB | within | predicted "
           "ms | measured ms | ratio to previous budget (p) |",
           "|---|---|---|---|---|---|---|---|---|"]
    ratio = {who: {x["to"]: x for x in res["rises"][who]} for who in ("optimize", "joint")}
    for r in res["sweep"]:
        for who in ("optimize", "joint"):
            m = r.get(who)
            if who == "joint" and r.get("joint_same_as_optimize"):
                md.append(f"| {_mib(r['budget'])} | joint | same as optimize "
                          f"({r['joint_point']['levers']}; predicted "
                          f"{_mib(r['joint_point']['peak'])} MiB, "
                          f"{_ms(r['joint_point']['seconds'])} ms in the exploration) "
                          f"| | | | | | |")
                continue
            if m is None:
                md.append(f"| {_mib(r['budget'])} | {who} | "
                          f"{r.get('joint_error') or 'no point fits'} | | | | | | |")
                continue
            if m.get("error"):
                md.append(f"| {_mib(r['budget'])} | {who} | **failed**: {m['error']} "
                          f"| | | | | | |")
                continue
            x = ratio[who].get(r["budget"])
            levers = m["levers"]
            if who == "joint" and r.get("joint_point"):
                jp = r["joint_point"]
                levers += (f" (as explored: {jp['recomputed']} recomputed, "
                           f"{_mib(jp['peak'])} MiB, {_ms(jp['seconds'])} ms)")
            rr = f"x{x['median_ratio']:.3f} (p={x['p']:.2g})" if x else ""
            md.append(f"| {_mib(r['budget'])} | {who} | {levers} | "
                      f"{_mib(m['predicted_peak'])} | {_mib(m['measured_peak'])} | "
                      f"{'yes' if m['within_budget'] else '**NO**'} | "
                      f"{_ms(m['predicted_seconds'])} | {_ms(m['median_seconds'])} | {rr} |")
    fr = res.get("front")
    if fr and fr.get("points"):
        md += ["", "## Pareto front: predicted against measured (must show 3)", "",
               f"Exploration at {_mib(fr['budget'])} MiB: {fr['points_planned']} points planned, "
               f"{fr['front_size']} on the front; {len(fr['points'])} measured"
               + (" (the front has fewer than 6 points: off-front points added)"
                  if fr["off_front_added"] else "") + ". Each point built with its settings "
               "forced, at the budget when it fits it, with no limit when not (as explored). "
               "Predicted = the exploration's point; rebuilt = the plan the measured module "
               "made (its own solve).", "",
               "| point | on front | fits | predicted MiB | rebuilt predicted MiB | measured "
               "MiB | predicted ms | rebuilt predicted ms | measured ms | rank predicted | "
               "rank measured |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        ok = [p for p in fr["points"] if p.get("median_seconds")]
        rp = dict(zip((p["label"] for p in ok), ranks([p["point"]["seconds"] for p in ok])))
        rm = dict(zip((p["label"] for p in ok), ranks([p["median_seconds"] for p in ok])))
        for p in fr["points"]:
            pt = p["point"]
            if p.get("error"):
                md.append(f"| {p['label']} | {'yes' if p['on_front'] else 'no'} | "
                          f"{'yes' if pt['fits'] else 'no'} | {_mib(pt['peak'])} | | "
                          f"**failed**: {p['error']} | {_ms(pt['seconds'])} | | | | |")
                continue
            md.append(f"| {pt['levers']}{' (chosen)' if p['chosen'] else ''} | "
                      f"{'yes' if p['on_front'] else 'no'} | {'yes' if pt['fits'] else 'no'} | "
                      f"{_mib(pt['peak'])} | {_mib(p['predicted_peak'])} | "
                      f"{_mib(p['measured_peak'])} | {_ms(pt['seconds'])} | "
                      f"{_ms(p['predicted_seconds'])} | {_ms(p['median_seconds'])} | "
                      f"{rp.get(p['label'], 0):g} | {rm.get(p['label'], 0):g} |")
        md += ["", f"Spearman rank correlation, predicted against measured step time: "
               f"**{fr['spearman_time']:.3f}** (with the rebuilt plans' predictions: "
               f"{fr['spearman_time_rebuilt']:.3f}); peaks: {fr['spearman_peak']:.3f}. "
               f"Discordant pairs: {len(fr['discordant'])} of {fr['pairs']}."]
        for d in fr["discordant"]:
            md.append(f"- predicted `{d['predicted_faster']}` faster than "
                      f"`{d['predicted_slower']}` by x{d['predicted_ratio']:.3f}; measured "
                      f"slower, x{1 / d['measured_ratio']:.3f}")
    md += ["", "## Explorations", ""]
    for e in res["explorations"]:
        md.append(f"- {_mib(e['budget'])} MiB: {len(e['points'])} points in "
                  f"{e['seconds']:.0f} s, {sum(p['front'] for p in e['points'])} on the front; "
                  f"chosen: {e['chosen']['levers'] if e['chosen'] else 'none fits'}"
                  + (f"; not planned: {'; '.join(e['skipped'])}" if e["skipped"] else ""))
    md += ["", f"Plot: `{meta['out']}.png`.", ""]
    if meta.get("notes"):
        md += ["## Notes", "", *meta["notes"], ""]
    return "\n".join(md)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    sweep = res["sweep"]
    b = [r["budget"] / MiB for r in sweep]
    ax = axes[0]
    ax.plot(b, b, "k--", label="budget")
    for who, mk, color in (("optimize", "o", "tab:blue"), ("joint", "s", "tab:orange")):
        pts = [(r["budget"] / MiB, r[who]["measured_peak"] / MiB) for r in sweep
               if (r.get(who) or {}).get("measured_peak")]
        if pts:
            ax.plot(*zip(*pts), mk + "-", color=color, label=f"{who}: measured peak", alpha=0.8)
    ax.axhline(res["eager_peak"] / MiB, color="grey", ls=":", label="eager fp32 peak")
    ax.set_xlabel("budget (MiB)")
    ax.set_ylabel("measured peak (MiB)")
    ax.set_title("measured peak against the budget")
    failed = [r["budget"] / MiB for r in sweep
              if any((r.get(w) or {}).get("error") for w in ("optimize", "joint"))]
    if failed:
        ax.scatter(failed, failed, marker="x", s=80, color="tab:red", zorder=5,
                   label="no plan made")
    ax.legend(fontsize="small")
    ax = axes[1]
    for who, mk, color in (("optimize", "o", "tab:blue"), ("joint", "s", "tab:orange")):
        pts = [(r["budget"] / MiB, 1e3 * r[who]["median_seconds"],
                1e3 * r[who]["predicted_seconds"]) for r in sweep
               if (r.get(who) or {}).get("median_seconds")]
        if pts:
            x, y, pr = zip(*pts)
            ax.plot(x, y, mk + "-", color=color, label=f"{who}: measured (median)")
            ax.plot(x, pr, mk + ":", color=color, alpha=0.5, label=f"{who}: predicted")
    ax.set_xlabel("budget (MiB)")
    ax.set_ylabel("step time (ms)")
    ax.set_title("step time against the budget")
    ax.legend(fontsize="small")
    ax = axes[2]
    fr = res.get("front") or {}
    ok = [p for p in fr.get("points", []) if p.get("median_seconds")]
    for p in ok:
        ax.scatter(1e3 * p["point"]["seconds"], 1e3 * p["median_seconds"],
                   marker="o" if p["point"]["exact"] else "^",
                   color="tab:red" if p["chosen"] else "tab:blue")
        ax.annotate(p["point"]["levers"], (1e3 * p["point"]["seconds"],
                                           1e3 * p["median_seconds"]), fontsize=6)
    ax.set_xlabel("predicted step time (ms, roofline)")
    ax.set_ylabel("measured step time (ms, median)")
    if ok:
        ax.set_title(f"Pareto points at {fr['budget'] / MiB:.2f} MiB: Spearman "
                     f"{fr['spearman_time']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(meta: dict, res: dict, out: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, out=out)
    (RESULTS / f"{out}.json").write_text(json.dumps({**meta, **res, "verdicts": verdicts(res)},
                                                    indent=1, default=str) + "\n")
    (RESULTS / f"{out}.md").write_text(markdown(meta, res))
    plot(res, RESULTS / f"{out}.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--budgets", type=int, default=6)
    p.add_argument("--margin", type=float, default=1.03)
    p.add_argument("--densities", type=lambda s: tuple(float(x) for x in s.split(",")),
                   default=(0.5, 0.05))
    p.add_argument("--front-budget", type=int, default=None)
    p.add_argument("--front-points", type=int, default=8)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=3.0)
    p.add_argument("--prefer", choices=("time", "exact"), default="time",
                   help="explore's choice (fxmem.planning.joint.choose): the fastest point that "
                        "fits ('time', default), or exact points first ('exact')")
    p.add_argument("--out", default="joint_sweep")
    p.add_argument("--rewrite", action="store_true",
                   help="rewrite <out>.md and .png from <out>.json (nothing run)")
    ns = p.parse_args(argv)
    if ns.rewrite:
        data = json.loads((RESULTS / f"{ns.out}.json").read_text())
        meta = {k: data.pop(k) for k in ("command", "date", "torch", "python", "cpu", "threads",
                                         "time_limit", "densities", "prefer", "total_seconds",
                                         "notes")
                if k in data}
        data.pop("verdicts", None)
        data.pop("out", None)
        data["rises"] = {who: rises(data["sweep"], who) for who in ("optimize", "joint")}
        data["violations"] = violations(data["sweep"])
        write(meta, data, ns.out)
        return 0
    if ns.budgets < 2:
        p.error("--budgets must be at least 2")
    res = run(ns)
    meta = {"command": "python bench/joint_sweep.py" + (" " + " ".join(argv if argv is not None
                                                                      else sys.argv[1:])
                                                       ).rstrip(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "threads": ns.threads, "time_limit": ns.time_limit, "densities": list(ns.densities),
            "prefer": ns.prefer, "total_seconds": time.perf_counter() - _T0}
    write(meta, res, ns.out)
    v = verdicts(res)
    say(f"verdicts: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
