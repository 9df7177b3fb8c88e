"""The ``fxmem`` command line: ``fxmem estimate MODULE:FACTORY``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import FxmemError

__all__ = ["main"]


def _estimate(ns: argparse.Namespace) -> int:
    from .report import format_comparison, plot_memory
    from .workload import load_workload

    workload = load_workload(ns.factory)
    est = workload.estimate()
    measured = None if ns.no_measure else workload.measure()
    row = {"name": workload.name, "estimate": est, "measured": measured}
    opt = f", optimizer {est.optimizer.name}" if est.optimizer else ", no optimizer"
    print(f"fxmem estimate: {workload.name} on {est.device}{opt} (one steady-state iteration)")
    print(format_comparison([row]))
    if ns.plot:
        print(f"plot: {plot_memory(est, measured, ns.plot, title=workload.name)}")
    if ns.json:
        record = {
            "name": workload.name,
            "device": str(est.device),
            "predicted_peak": est.peak,
            "peak_at": est.peak_at,
            "peak_phase": est.peak_phase,
            "breakdown": est.breakdown(),
            "measured_peak": None if measured is None else measured.peak,
        }
        with open(ns.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxmem", description="Fit a training step into a memory budget.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("estimate", help="predict (and measure) the peak memory of a training step")
    p.add_argument("factory", help="MODULE:FACTORY returning the model and its inputs (and optimizer)")
    p.add_argument("--no-measure", action="store_true", help="predict only; do not run the step")
    p.add_argument("--plot", metavar="PNG", help="write predicted vs measured memory to this PNG")
    p.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING)
    try:
        return _estimate(ns)
    except FxmemError as exc:
        print(f"fxmem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
