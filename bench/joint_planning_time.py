"""How long the joint planner takes on GPT-2 small (124M parameters) with all four levers.

Builds ``transformers.GPT2LMHeadModel(GPT2Config(...))`` from a config (no download; the
``hf_gpt2`` workload of ``bench/workloads.py`` at 12 layers, n_embd 768, 12 heads, GPT-2's
vocabulary and 256 positions: 123.8M parameters), batch 8 x 256, AdamW, and times one
``fxmem.planning.joint.explore`` with ``allow=("recompute", "microbatch", "precision",
"sparse")`` (``--levers``) under the budget (default 3 GiB, Inductor lowering, 3 s per solve, the
floors searched as ``explore`` does by default; ``--search needed``, ``--no-floors``). While it
runs, the functions below are wrapped with timers, and each phase is charged the time spent in
its functions minus the time in the other phases' functions they call (exclusive time; "other"
is the rest: Python glue, graph copies, tqdm):

- ``Dynamo+AOTAutograd capture``: ``OptimizedModule._plan_once`` (the step captured by
  TorchDynamo, AOTAutograd's joint graph, up to the partitioner);
- ``batch analysis``: ``capture_step`` called by the microbatch lever (the whole batch's step
  traced with make_fx for its batch dimensions);
- ``sparsify + kernel timing``: ``_sparsify_in_place`` (the model sparsified at a density,
  each layer's kernel timed on its input);
- ``kernel scratch measured``: ``fxmem.memory.kernel_scratch._measure`` (bf16 matrix products
  and CPU attention run once per shape);
- ``problem build``: ``RecomputeLever.analyse`` (costs, the storage table, the linear model);
- ``solves``: ``RecomputeLever.solve`` and ``.smallest_peak`` (the ILP, CBC);
- ``realise``: ``RecomputeLever.apply``, ``plan_storages`` and ``simulate`` (a decision's graphs
  and their exact memory);
- ``planner other``: the rest of the planner (``plan_joint``; the step labelled, stored-low
  casts offered);
- ``predicted time``: ``plan_seconds`` (the roofline of a plan's graphs).

Each run is kept in ``bench/results/joint_planning_time.json`` under its ``--label``; the
Markdown file ``bench/results/joint_planning_time.md`` is written from every run kept there, a
label ``before-X`` compared point by point with ``after-X`` (``--src`` runs another tree's
fxmem, e.g. an export of the commit before a change, for the "before"; ``--notes`` keeps a
paragraph on how the runs were made; ``--rewrite`` writes the Markdown without running).

    python bench/joint_planning_time.py --label after-all-levers
    python bench/joint_planning_time.py --label before-3levers --src /tmp/fxmem-before \
        --levers recompute,microbatch,precision
    python bench/joint_planning_time.py --label after-needed --search needed
    python bench/joint_planning_time.py --layers 2 --embd 128 --batch 4 --seq 64 --vocab 2048 \
        --label tiny --out /tmp/tiny  # a small config to iterate on
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NAME = "joint_planning_time"
MiB = 2**20
ALL_LEVERS = ("recompute", "microbatch", "precision", "sparse")

PHASES = [  # (phase, module, attribute path)
    ("Dynamo+AOTAutograd capture", "fxmem.api.optimize", "OptimizedModule._plan_once"),
    ("batch analysis", "fxmem.levers.microbatch.lever", "capture_step"),
    ("sparsify + kernel timing", "fxmem.levers.sparse.fallback", "_sparsify_in_place"),
    ("kernel scratch measured", "fxmem.memory.kernel_scratch", "_measure"),
    ("problem build", "fxmem.levers.recompute.lever", "RecomputeLever.analyse"),
    ("solves", "fxmem.levers.recompute.lever", "RecomputeLever.solve"),
    ("solves", "fxmem.levers.recompute.lever", "RecomputeLever.smallest_peak"),
    ("realise", "fxmem.levers.recompute.lever", "RecomputeLever.apply"),
    ("realise", "fxmem.planning.planner", "plan_storages"),
    ("realise", "fxmem.planning.planner", "simulate"),
    ("planner other", "fxmem.planning.planner", "plan_joint"),
    ("planner other", "fxmem.api.backend", "plan_joint"),
    ("planner other", "fxmem.planning.planner", "PreparedJoint.plan"),
    ("planner other", "fxmem.planning.planner", "prepare_joint"),
    ("predicted time", "fxmem.planning.joint", "plan_seconds"),
]


class PhaseTimer:
    """Exclusive wall time per phase: a wrapped call's time, less its wrapped callees'."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[float]] = []  # per open call: [time in wrapped callees]
        self.patched: list[tuple[object, str, object]] = []

    def wrap(self, phase: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._stack.append([0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                inner = self._stack.pop()[0]
                self.seconds[phase] = self.seconds.get(phase, 0.0) + spent - inner
                self.calls[phase] = self.calls.get(phase, 0) + 1
                if self._stack:
                    self._stack[-1][0] += spent
        timed.__wrapped_by_phase_timer__ = True
        return timed

    def install(self, phases=PHASES) -> list[str]:
        import importlib

        missing = []
        for phase, module_name, path in phases:
            try:
                owner = importlib.import_module(module_name)
                *outer, attr = path.split(".")
                for part in outer:
                    owner = getattr(owner, part)
                fn = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            except (ImportError, AttributeError, KeyError):
                missing.append(f"{module_name}.{path}")
                continue
            if getattr(fn, "__wrapped_by_phase_timer__", False):
                continue
            if isinstance(fn, (staticmethod, classmethod)):
                continue
            self.patched.append((owner, attr, fn))
            setattr(owner, attr, self.wrap(phase, fn))
        return missing

    def uninstall(self) -> None:
        for owner, attr, fn in reversed(self.patched):
            setattr(owner, attr, fn)
        self.patched.clear()


def build(layers: int, embd: int, heads: int, batch: int, seq: int, vocab: int):
    from bench.workloads import hf_gpt2

    import torch

    w = hf_gpt2(batch=batch, seq=seq, n_layer=layers, n_embd=embd, n_head=heads,
                vocab_size=vocab)
    optimizer = torch.optim.AdamW(w["model"].parameters())
    return w["model"], w["kwargs"], optimizer


def cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)  # children: CBC
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def run(ns) -> dict:
    import torch

    import fxmem
    from fxmem.budget import parse_budget
    from fxmem.planning.joint import explore

    torch._functorch.config.enable_autograd_cache = False
    torch._inductor.config.fx_graph_cache = False
    model, kwargs, optimizer = build(ns.layers, ns.embd, ns.heads, ns.batch, ns.seq, ns.vocab)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2: {n_params / 1e6:.1f}M parameters, batch {ns.batch} x {ns.seq}, fxmem from "
          f"{Path(fxmem.__file__).parent}", flush=True)
    timer = PhaseTimer()
    missing = timer.install()
    load0 = os.getloadavg()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    try:
        e = explore(model, budget=ns.budget, allow=ns.levers, optimizer=optimizer,
                    lowering=ns.lowering, time_limit=ns.time_limit, floors=ns.floors,
                    progress=not ns.no_progress, **({"search": ns.search} if ns.search else {}),
                    **kwargs)
    finally:
        timer.uninstall()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    load1 = os.getloadavg()
    phases = dict(sorted(timer.seconds.items(), key=lambda kv: -kv[1]))
    phases["other"] = wall - sum(timer.seconds.values())
    return {
        "label": ns.label,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "fxmem": str(Path(fxmem.__file__).parent),
        "torch": torch.__version__,
        "cpu": _cpu(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "load_before": load0, "load_after": load1,
        "parameters": n_params,
        "config": dict(layers=ns.layers, embd=ns.embd, heads=ns.heads, batch=ns.batch,
                       seq=ns.seq, vocab=ns.vocab, budget=parse_budget(ns.budget),
                       lowering=ns.lowering, time_limit=ns.time_limit, floors=ns.floors,
                       levers=list(ns.levers), search=ns.search or "all"),
        "seconds": wall, "cpu_seconds": cpu, "explore_seconds": e.seconds,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "phases": phases, "calls": timer.calls, "not_timed": missing,
        "points": [dict(k=p.microbatches, precision=p.precision, density=p.density, peak=p.peak,
                        seconds=p.seconds, fits=p.fits, floor=p.floor, recomputed=p.recomputed)
                   for p in e.points],
        "chosen": None if e.chosen is None else e.chosen.levers,
        "chosen_key": None if e.chosen is None else [e.chosen.microbatches, e.chosen.precision,
                                                      e.chosen.density],
        "front": [[p.microbatches, p.precision, p.density] for p in e.front],
        "floor": e.floor,
        "skipped": list(e.skipped),
    }


def _cpu() -> str:
    try:
        from bench.environment import cpu_name

        return cpu_name()
    except ImportError:  # pragma: no cover
        return platform.processor()


def _key(p) -> str:
    return f"k={p['k']} {p['precision']}" + (f" d={p['density']:g}" if p["density"] else "")


def write_markdown(runs: dict, path: Path, notes: str = "") -> None:
    lines = ["# Joint planner time: GPT-2 small (124M), all four levers", ""]
    lines += ["`fxmem.planning.joint.explore` on `GPT2LMHeadModel` built from a config (12 layers, "
              "n_embd 768, 12 heads, vocabulary 50257, 256 positions: 123.8M parameters; "
              "`bench/workloads.py` "
              "`hf_gpt2`), batch 8 x 256, AdamW, Inductor lowering, 3 s per solve; each run's "
              "levers, search and floors are in its row. Phases are exclusive wall time of the "
              "functions named in the script's docstring. The machine has 2 CPU cores shared "
              "with other workers: the load average (1 min) is given before and after each run; "
              "CPU seconds count fxmem's process and CBC's.", ""]
    lines += ["| run | levers | search | floors | points | wall s | CPU s | load | chosen | "
              "floor MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in runs.items():
        c = r["config"]
        lines.append(
            f"| {label} | {', '.join(c.get('levers', ALL_LEVERS))} | {c.get('search', 'all')} | "
            f"{'yes' if c['floors'] else 'no'} | {len(r['points'])} | {r['seconds']:.1f} | "
            f"{r['cpu_seconds']:.1f} | {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f} | "
            f"{r['chosen']} | " + (f"{r['floor'] / MiB:.2f}" if r["floor"] else "-") + " |")
    lines.append("")
    if notes:
        lines += [notes.strip(), ""]
    labels = list(runs)
    for label in labels:
        r = runs[label]
        c = r["config"]
        lines += [f"## {label}", "",
                  f"{r['date']}, torch {r['torch']}, {r['cpu']} ({r['cores']} cores, "
                  f"{r['threads']} torch threads), {r['parameters'] / 1e6:.1f}M parameters, "
                  f"batch {c['batch']} x {c['seq']}, budget {c['budget'] / MiB:.0f} MiB, "
                  f"levers {', '.join(c.get('levers', ALL_LEVERS))}, "
                  f"search {c.get('search', 'all')}, "
                  f"floors {'searched' if c['floors'] else 'not searched'}; "
                  f"load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}.", "",
                  f"Command: `{r['command']}`", "",
                  f"**{r['seconds']:.1f} s wall** ({r['cpu_seconds']:.1f} CPU s), "
                  f"{len(r['points'])} points planned; chosen: {r['chosen']}; floor over all "
                  f"combinations: " + (f"{r['floor'] / MiB:.2f} MiB" if r["floor"] else "-"), "",
                  "| phase | seconds | share | calls |", "|---|---|---|---|"]
        for phase, s in r["phases"].items():
            lines.append(f"| {phase} | {s:.1f} | {100 * s / r['seconds']:.0f}% | "
                         f"{r['calls'].get(phase, '')} |")
        lines += ["", "| combination | predicted peak MiB | predicted ms | fits | floor MiB | "
                  "recomputed |", "|---|---|---|---|---|---|"]
        for p in r["points"]:
            lines.append(f"| {_key(p)} | {p['peak'] / MiB:.2f} | {1e3 * p['seconds']:.1f} | "
                         f"{'yes' if p['fits'] else 'no'} | "
                         f"{p['floor'] / MiB if p['floor'] else 0:.2f} | {p['recomputed']} |")
        if r["skipped"]:
            lines += [""] + [f"- not planned: {s}" for s in r["skipped"]]
        lines.append("")
    pairs = [(a, "after" + a[len("before"):]) for a in labels if a.startswith("before")]
    for la, lb in [(a, b) for a, b in pairs if b in runs]:
        a, b = runs[la], runs[lb]
        lines += [f"## {la} against {lb}", "",
                  f"Wall: {a['seconds']:.1f} s -> {b['seconds']:.1f} s "
                  f"({a['seconds'] / b['seconds']:.1f}x); CPU: {a['cpu_seconds']:.1f} s -> "
                  f"{b['cpu_seconds']:.1f} s ({a['cpu_seconds'] / b['cpu_seconds']:.1f}x). "
                  "Per phase (s): " + ", ".join(
                      f"{k} {a['phases'].get(k, 0):.1f} -> {b['phases'].get(k, 0):.1f}"
                      for k in dict.fromkeys([*a["phases"], *b["phases"]])) + ".", "",
                  "| combination | peak MiB | ms | fits | floor MiB | recomputed |",
                  "|---|---|---|---|---|---|"]
        pb = {_key(p): p for p in b["points"]}
        cells = (lambda v: f"{v['peak'] / MiB:.2f}", lambda v: f"{1e3 * v['seconds']:.2f}",
                 lambda v: "yes" if v["fits"] else "no",
                 lambda v: f"{v['floor'] / MiB:.2f}" if v["floor"] else "-",
                 lambda v: str(v["recomputed"]))
        same = 0
        for p in a["points"]:
            q = pb.get(_key(p))
            row = []
            for f in cells:
                x, y = f(p), None if q is None else f(q)
                row.append(x if y is None or x == y else f"{x} -> {y}")
            same += q is not None and all(f(p) == f(q) for f in cells)
            lines.append(f"| {_key(p)} | " + " | ".join(row) + " |"
                         + ("" if q is not None else f" (not in {lb})"))
        lines += ["", f"{same} of {len(a['points'])} points identical (to the byte, the "
                  f"0.01 ms and the count). Chosen: {a['chosen']} -> {b['chosen']}; floor: "
                  f"{(a['floor'] or 0) / MiB:.2f} -> {(b['floor'] or 0) / MiB:.2f} MiB.", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="the run's name in the results")
    parser.add_argument("--src", help="import fxmem from this checkout instead of this one")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--heads", type=int, default=None, help="default: n_embd / 64")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--budget", default="3GiB")
    parser.add_argument("--levers", default=",".join(ALL_LEVERS),
                        help="the levers allowed (default: all four)")
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--time-limit", type=float, default=3.0)
    parser.add_argument("--no-floors", dest="floors", action="store_false")
    parser.add_argument("--search", choices=["all", "needed"], default=None,
                        help="explore's search (default: its own, 'all'; a checkout before "
                             "the option has only 'all')")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--notes", help="Markdown kept with the results and written after the "
                        "summary table (how the before and after trees were made)")
    parser.add_argument("--rewrite", action="store_true",
                        help="write the Markdown from the runs kept, without running")
    parser.add_argument("--out", default=str(RESULTS / NAME),
                        help="results path without suffix (.json and .md are written)")
    ns = parser.parse_args(argv)
    ns.heads = ns.heads or max(1, ns.embd // 64)
    ns.levers = tuple(ns.levers.split(","))
    sys.path.insert(0, str(ROOT))  # bench.workloads
    if ns.src:
        sys.path.insert(0, str(Path(ns.src).resolve()))
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store = out.with_suffix(".json")
    kept = json.loads(store.read_text()) if store.exists() else {}
    kept.setdefault("runs", {})
    if ns.notes is not None:
        kept["notes"] = ns.notes
    if ns.rewrite:
        store.write_text(json.dumps(kept, indent=1))
        write_markdown(kept["runs"], out.with_suffix(".md"), kept.get("notes", ""))
        print(f"written: {store}, {out.with_suffix('.md')}")
        return 0
    record = run(ns)
    kept["runs"][ns.label] = record
    store.write_text(json.dumps(kept, indent=1))
    write_markdown(kept["runs"], out.with_suffix(".md"), kept.get("notes", ""))
    print(f"{ns.label}: {record['seconds']:.1f} s wall, {record['cpu_seconds']:.1f} CPU s; "
          + ", ".join(f"{k} {v:.1f}" for k, v in record["phases"].items()), flush=True)
    print(f"written: {store}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
