"""Predicted vs measured peak memory of the eager training step on the bench workloads.

For each workload (GPT decoder, WRN-28-2, Hugging Face GPT-2), with no optimizer and with Adam,
this predicts the peak of one steady-state iteration with ``fxmem.estimate`` (fake tensors, nothing
run) and measures it with ``fxmem.measure_memory`` on the same machine, in the same process.
Writes ``bench/results/estimate_accuracy.{md,json}`` and one PNG per case.

    python bench/estimate_accuracy.py [--workloads gpt_decoder,wrn_28_2] [--tolerance 0.05]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workloads import WORKLOADS  # noqa: E402
from fxmem import Workload, format_bytes  # noqa: E402
from fxmem.planning.report import format_comparison, plot_memory  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def run_case(name: str, with_adam: bool) -> dict:
    workload = Workload.from_factory_result(WORKLOADS[name](), name=name)
    if with_adam:
        workload.optimizer = torch.optim.Adam(workload.model.parameters(), lr=1e-4)
    label = f"{name}+adam" if with_adam else name
    t0 = time.perf_counter()
    est = workload.estimate()
    t_est = time.perf_counter() - t0
    measured = workload.measure(warmup=1)
    png = plot_memory(est, measured, RESULTS / f"estimate_{label}.png", title=f"{label} (cpu)")
    error = (est.peak - measured.peak) / measured.peak
    print(f"{label:>18}: predicted {format_bytes(est.peak)}, measured {format_bytes(measured.peak)}, "
          f"error {100 * error:+.2f}%  (estimate took {t_est:.1f}s)", flush=True)
    row = {"name": label, "estimate": est, "measured": measured}
    record = {
        "workload": label,
        "predicted_peak": est.peak,
        "measured_peak": measured.peak,
        "relative_error": error,
        "peak_at": est.peak_at,
        "peak_phase": est.peak_phase,
        "breakdown_at_peak": est.breakdown(),
        "optimizer": est.optimizer.name if est.optimizer else None,
        "measured_start": measured.start,
        "estimate_seconds": t_est,
        "plot": str(png.relative_to(ROOT)),
    }
    del workload
    gc.collect()
    return {"row": row, "record": record}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--tolerance", type=float, default=0.05)
    ns = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    cases = [run_case(n, adam) for n in ns.workloads.split(",") for adam in (False, True)]
    records = [c["record"] for c in cases]
    worst = max(abs(r["relative_error"]) for r in records)
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": "cpu",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "python": platform.python_version(),
    }
    table = format_comparison([c["row"] for c in cases], markdown=True)
    verdict = "PASS" if worst <= ns.tolerance else "FAIL"
    md = [
        "# Predicted vs measured peak of the eager training step",
        "",
        f"{env['date']}, torch {env['torch']}, {env['device']} ({env['machine']}).",
        "One steady-state iteration (forward, loss, backward; `+adam`: and `Adam.step()` with its "
        "state resident), measured after one warm-up iteration. Predicted by `fxmem.estimate` on "
        "fake tensors; measured by `fxmem.measure_memory` (bytes live at start + profiler "
        "allocation events). Breakdown is at the predicted peak.",
        "",
        table,
        "",
        f"Largest |error|: {100 * worst:.3f}% (tolerance {100 * ns.tolerance:.0f}%): **{verdict}**.",
        "",
        "Reproduce: `python bench/estimate_accuracy.py`",
        "",
    ]
    (RESULTS / "estimate_accuracy.md").write_text("\n".join(md))
    (RESULTS / "estimate_accuracy.json").write_text(json.dumps({"env": env, "cases": records}, indent=2))
    print(table)
    print(f"largest |error| {100 * worst:.3f}% -> {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
