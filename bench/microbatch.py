"""The microbatch lever: peak memory against k, and BatchNorm per microbatch on real data.

1. **Peak vs k.** For gpt_decoder and hf_gpt2 (no BatchNorm), ``fxmem.optimize(model, budget,
   allow=("microbatch",), microbatches=k)`` for k in 1, 2, 4, 8: the plan's predicted peak and the
   peak ``fxmem.measure_memory`` measures for one step (eager lowering). Target: within 5%.
2. **Budgets.** ``allow=("recompute", "microbatch")`` at budgets under the whole batch's peak: the
   k the plan picked and the measured peak, which must be under the budget whenever k > 1.
3. **BatchNorm on digits.** WRN-28-2 (1 input channel) trained on scikit-learn's 8x8 digits
   (1437 train / 360 test images, fixed split), batch 128, SGD; whole-batch training against
   ``microbatches=4, microbatch_coupling="per-microbatch"`` (BatchNorm statistics per microbatch,
   running statistics updated once per step), same initialisation and data order, mean test
   accuracy over seeds. Target: within 0.5 points.

Writes ``bench/results/microbatch.{md,json}`` and ``microbatch_peak_vs_k.png``.

    python bench/microbatch.py [--epochs 15] [--seeds 0,1,2,3,4] [--ks 1,2,4,8]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fxmem  # noqa: E402
from bench.environment import cpu_name  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402
from fxmem.examples import wide_resnet_28_2  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MiB = 2**20
PEAK_ERROR_LIMIT = 0.05
ACCURACY_LIMIT = 0.5  # points


def measured_peak(model, call, args, kwargs) -> int:
    def step():
        out = call(*args, **kwargs)
        fxmem.loss_from_output(out).backward()

    model.zero_grad(set_to_none=True)
    gc.collect()
    peak = fxmem.measure_memory(step, device="cpu", baseline=[model, list(args),
                                                               list(kwargs.values())]).peak
    model.zero_grad(set_to_none=True)
    return peak


def peak_vs_k(name: str, ks) -> list[dict]:
    rows = []
    for k in ks:
        torch._dynamo.reset()
        w = WORKLOADS[name]()
        model, args, kwargs = w["model"], w["args"], w["kwargs"]
        om = fxmem.optimize(model, "1TiB", allow=("microbatch",), microbatches=k,
                            microbatch_coupling="per-microbatch", lowering="eager")
        fxmem.loss_from_output(om(*args, **kwargs)).backward()  # plans and compiles
        plan = om.plan
        peak = measured_peak(model, om, args, kwargs)
        err = (plan.predicted_peak - peak) / peak
        rows.append(dict(workload=name, k=k, sizes=list(plan.microbatch.sizes) if plan.microbatch
                         else [args[0].shape[0] if args else None], predicted=plan.predicted_peak,
                         measured=peak, error=err, ok=abs(err) <= PEAK_ERROR_LIMIT))
        print(f"{name} k={k}: predicted {plan.predicted_peak / MiB:.1f} MiB, measured "
              f"{peak / MiB:.1f} MiB ({100 * err:+.2f}%)", flush=True)
    return rows


def budgets(name: str, fractions) -> list[dict]:
    rows = []
    whole = None
    for f in fractions:
        torch._dynamo.reset()
        w = WORKLOADS[name]()
        model, args, kwargs = w["model"], w["args"], w["kwargs"]
        if whole is None:
            probe = fxmem.optimize(model, "1TiB", lowering="eager")
            fxmem.loss_from_output(probe(*args, **kwargs)).backward()
            whole = probe.plan.unoptimized_peak
            model.zero_grad(set_to_none=True)
            torch._dynamo.reset()
        budget = int(f * whole)
        om = fxmem.optimize(model, budget, allow=("recompute", "microbatch"), lowering="eager",
                            microbatch_coupling="per-microbatch")  # dropout drawn per microbatch
        try:
            fxmem.loss_from_output(om(*args, **kwargs)).backward()
        except fxmem.BudgetError as exc:
            rows.append(dict(workload=name, fraction=f, budget=budget, error=str(exc)[:200]))
            print(f"{name} budget {budget / MiB:.1f} MiB: infeasible", flush=True)
            continue
        plan = om.plan
        k = len(plan.microbatch.sizes) if plan.microbatch else 1
        peak = measured_peak(model, om, args, kwargs)
        rows.append(dict(workload=name, fraction=f, budget=budget, k=k,
                         recomputed=len(plan.record.recomputed), predicted=plan.predicted_peak,
                         measured=peak, within=peak <= budget))
        print(f"{name} budget {budget / MiB:.1f} MiB ({f:.2f} x whole): k={k}, predicted "
              f"{plan.predicted_peak / MiB:.1f}, measured {peak / MiB:.1f} MiB "
              f"({'within' if peak <= budget else 'OVER'})", flush=True)
    return rows


def digits_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def train_digits(seed: int, epochs: int, microbatches: int | None, batch: int = 128) -> dict:
    xtr, ytr, xte, yte = digits_data()
    torch.manual_seed(seed)
    model = wide_resnet_28_2(num_classes=10, in_channels=1).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    step = model if microbatches is None else fxmem.optimize(
        model, "1TiB", allow=("microbatch",), microbatches=microbatches,
        microbatch_coupling="per-microbatch", loss_fn=loss_of)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch):
            idx = order[i:i + batch]
            if len(idx) < 2 * (microbatches or 1):  # BatchNorm needs 2 samples per microbatch
                continue
            loss = (loss_of(model, xtr[idx], ytr[idx]) if microbatches is None
                    else step(xtr[idx], ytr[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item() * 100
    report = step.plan.microbatch if microbatches else None
    return dict(seed=seed, microbatches=microbatches, accuracy=acc,
                seconds=time.perf_counter() - t0, report=str(report) if report else None)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4))
    for ax, name in zip([axes] if len(names) == 1 else axes, names):
        rs = [r for r in rows if r["workload"] == name]
        ks = [r["k"] for r in rs]
        ax.plot(ks, [r["predicted"] / MiB for r in rs], "o--", label="predicted")
        ax.plot(ks, [r["measured"] / MiB for r in rs], "s-", label="measured")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("microbatches k")
        ax.set_ylabel("peak MiB")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--workloads", default="gpt_decoder,hf_gpt2")
    parser.add_argument("--fractions", default="0.8,0.6,0.45")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", default="microbatch", help="results file stem")
    ns = parser.parse_args(argv)
    t0 = time.perf_counter()
    ks = [int(k) for k in ns.ks.split(",")]
    names = ns.workloads.split(",")
    peaks = [r for n in names for r in peak_vs_k(n, ks)]
    budget_rows = [r for n in names for r in budgets(n, [float(f) for f in ns.fractions.split(",")])]
    runs = []
    for seed in [int(s) for s in ns.seeds.split(",")]:
        for mb in (None, 4):
            runs.append(train_digits(seed, ns.epochs, mb))
            print(f"digits seed {seed} {'whole batch' if mb is None else f'k={mb}'}: "
                  f"{runs[-1]['accuracy']:.2f}% ({runs[-1]['seconds']:.0f}s)", flush=True)
    whole = [r["accuracy"] for r in runs if r["microbatches"] is None]
    micro = [r["accuracy"] for r in runs if r["microbatches"] is not None]
    diff = sum(micro) / len(micro) - sum(whole) / len(whole)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(peaks, RESULTS / f"{ns.out}_peak_vs_k.png")
    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
               torch=torch.__version__, cpu=cpu_name(), threads=torch.get_num_threads())
    (RESULTS / f"{ns.out}.json").write_text(json.dumps(
        dict(env=env, peak_vs_k=peaks, budgets=budget_rows, digits=runs,
             accuracy_difference=diff, wall_seconds=time.perf_counter() - t0), indent=1))
    lines = [f"# Microbatching (CPU)", "",
             f"{env['date']}, torch {env['torch']}, {env['cpu']} ({env['threads']} threads). "
             "Eager lowering; peaks from `fxmem.measure_memory` of one step.", "",
             "## Peak against k (`allow=(\"microbatch\",)`, k forced)", "",
             "| workload | k | sizes | predicted MiB | measured MiB | error | within 5% |",
             "|---|---|---|---|---|---|---|"]
    for r in peaks:
        lines.append(f"| {r['workload']} | {r['k']} | {r['sizes']} | {r['predicted'] / MiB:.1f} | "
                     f"{r['measured'] / MiB:.1f} | {100 * r['error']:+.2f}% | "
                     f"{'yes' if r['ok'] else '**no**'} |")
    lines += ["", f"![peak vs k]({ns.out}_peak_vs_k.png)", "",
              "## Budgets (`allow=(\"recompute\", \"microbatch\")`: the plan picks k)", "",
              "| workload | budget MiB | k | recomputed ops | predicted MiB | measured MiB | within |",
              "|---|---|---|---|---|---|---|"]
    for r in budget_rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['budget'] / MiB:.1f} | infeasible | | | | |")
            continue
        lines.append(f"| {r['workload']} | {r['budget'] / MiB:.1f} | {r['k']} | {r['recomputed']} "
                     f"| {r['predicted'] / MiB:.1f} | {r['measured'] / MiB:.1f} | "
                     f"{'yes' if r['within'] else '**no**'} |")
    lines += ["", f"## WRN-28-2 on scikit-learn digits, {ns.epochs} epochs, batch 128", "",
              "| seed | whole batch | k=4, BatchNorm per microbatch |", "|---|---|---|"]
    for s in sorted({r["seed"] for r in runs}):
        a = {r["microbatches"]: r["accuracy"] for r in runs if r["seed"] == s}
        lines.append(f"| {s} | {a[None]:.2f}% | {a[4]:.2f}% |")
    lines += ["", f"Mean test accuracy: whole batch {sum(whole) / len(whole):.2f}%, microbatched "
              f"{sum(micro) / len(micro):.2f}% (difference {diff:+.2f} points; target within "
              f"{ACCURACY_LIMIT}).", "", "Plan note: "
              + (next(r["report"] for r in runs if r["report"]) or "").replace("\n", " ")]
    (RESULTS / f"{ns.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
