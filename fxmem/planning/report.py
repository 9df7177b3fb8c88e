"""Printing and plotting estimates and measurements. Data in, text or a PNG out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fxmem.budget import format_bytes
from fxmem.memory.simulation import CATEGORIES

__all__ = ["format_estimate", "format_comparison", "plot_memory", "plot_plan"]


def format_estimate(est) -> str:
    """The peak, where it happens, and the breakdown at the peak."""
    lines = [
        f"predicted peak {format_bytes(est.peak)} on {est.device} "
        f"at {est.peak_at} ({est.peak_phase})",
    ]
    if est.optimizer is not None:
        lines.append(f"optimizer: {est.optimizer.name}")
    width = max(len(c) for c in CATEGORIES)
    for cat, b in est.breakdown().items():
        lines.append(f"  {cat:<{width}}  {format_bytes(b):>12}")
    return "\n".join(lines)


def format_comparison(rows: Sequence[dict], markdown: bool = False) -> str:
    """A table with one column per workload: breakdown at the predicted peak, predicted and
    measured peak, and the relative error.

    Each row dict has ``name``, ``estimate`` (a MemoryEstimate) and ``measured`` (MeasuredMemory
    or None).
    """
    header = ["", *(r["name"] for r in rows)]
    body: list[list[str]] = []
    for cat in CATEGORIES:
        body.append([cat, *(format_bytes(r["estimate"].breakdown()[cat]) for r in rows)])
    body.append(["predicted peak", *(format_bytes(r["estimate"].peak) for r in rows)])
    body.append(["peak at", *(f"{r['estimate'].peak_at} ({r['estimate'].peak_phase})" for r in rows)])
    body.append(["measured peak", *(_measured(r) for r in rows)])
    body.append(["error", *(_error(r) for r in rows)])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(out)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = lambda row: "  ".join(  # noqa: E731
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(row, widths))
    )
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt(header), rule, *map(fmt, body[: len(CATEGORIES)]), rule,
                      *map(fmt, body[len(CATEGORIES):])])


def _fraction(allocated: np.ndarray) -> np.ndarray:
    total = float(allocated[-1]) if len(allocated) and allocated[-1] > 0 else 1.0
    return allocated / total


def _measured(row) -> str:
    return "-" if row.get("measured") is None else format_bytes(row["measured"].peak)


def _error(row) -> str:
    m = row.get("measured")
    if m is None:
        return "-"
    return f"{100.0 * (row['estimate'].peak - m.peak) / m.peak:+.2f}%"


def plot_memory(est, measured=None, path: str | Path = "memory.png", title: str = "") -> Path:
    """Stacked predicted bytes by category over the step, with the measured live bytes on top.

    Both are drawn against the bytes allocated so far in the step (as a fraction of the step's
    total), an axis the prediction and the allocator share: when the model is right, the same
    allocations happen in the same order, whatever each op costs in time.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc

    mib = 2.0**20
    live = est.timeline.live / mib
    x = _fraction(est.timeline.allocated)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    keep = [k for k in range(len(CATEGORIES)) if live[:, k].any()]
    ax.stackplot(x, live[:, keep].T, labels=[CATEGORIES[k] for k in keep], alpha=0.75, step="post")
    ax.axhline(est.peak / mib, color="k", ls="--", lw=0.8,
               label=f"predicted peak {format_bytes(est.peak)} at {est.peak_at}")
    if measured is not None:
        ax.plot(_fraction(measured.allocated), measured.live / mib, color="crimson", lw=1.0,
                drawstyle="steps-post", label=f"measured ({format_bytes(measured.peak)} peak)")
    if 0 < est.timeline.backward_start < len(live):
        xb = x[est.timeline.backward_start]
        ax.axvline(xb, color="grey", lw=0.8, ls=":")
        ax.text(xb, est.peak / mib * 0.5, " backward", fontsize=8, color="grey")
    ax.set_xlabel("bytes allocated so far in the step (fraction of the step's total)")
    ax.set_ylabel("MiB live on " + str(est.device))
    ax.set_title(title or "fxmem: predicted vs measured memory")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    ax.set_xlim(0, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_plan(plan) -> str:
    """What a plan saves and recomputes, and its predicted peak against the budget."""
    sol = plan.solution
    lines = [
        f"budget {format_bytes(plan.budget)}: predicted peak {format_bytes(plan.predicted_peak)} "
        f"(unoptimised {format_bytes(plan.unoptimized_peak)}, "
        f"{100.0 * (1 - plan.predicted_peak / plan.unoptimized_peak):.1f}% less)",
        f"strategy {sol.strategy} ({sol.status}"
        + (f", gap {100 * sol.gap:.2f}%" if sol.gap is not None else "")
        + f", {sol.solve_seconds:.2f}s over {plan.candidates} candidates; "
        f"{plan.solver_calls} solver call{'s' if plan.solver_calls != 1 else ''} in "
        f"{plan.plan_seconds:.1f}s of planning)",
        f"recompute: {plan.record.summary()}; predicted extra time "
        f"{1e3 * sol.recompute_time:.2f} ms",
        "levers used: " + (", ".join(
            (["recompute"] if plan.record.recomputed else [])
            + ([f"microbatch (k={len(plan.microbatch.sizes)})"]
               if getattr(plan, "microbatch", None) is not None else [])
            + ([f"sparse (density {plan.sparsity.density:.3f})"]
               if getattr(plan, "sparsity", None) is not None else [])
            + [f"precision ({r.details.dtype} compute)" for r in plan.provenance
               if r.name == "precision"]
            + [f"stored low ({len(r.details.values)} saved values in {r.details.dtype})"
               for r in plan.provenance if r.name == "stored-low" and r.details.values])
         or "none") + _exactness(plan),
        "at the predicted peak:",
    ]
    if getattr(plan, "loss_scale", None):
        lines.insert(4, plan.loss_scale)
    if getattr(plan, "microbatch", None) is not None:
        lines[4:4] = str(plan.microbatch).splitlines()
    width = max(len(c) for c in CATEGORIES)
    for cat, b in plan.timeline.breakdown().items():
        if b:
            lines.append(f"  {cat:<{width}}  {format_bytes(b):>12}")
    if plan.context.resident or plan.context.epilogue or plan.context.during_backward:
        lines.append("held beyond the graph: " + ", ".join(
            [f"{c} {format_bytes(b)}" for c, b in plan.context.resident]
            + [f"{c} {format_bytes(b)} during the backward" for c, b in plan.context.during_backward]
            + [f"{label} temporaries {format_bytes(b)}" for label, b in plan.context.epilogue]))
    lines += [f"note: {note}" for note in plan.notes]
    if plan.provenance:
        lines.append("passes (plan.provenance has each graph before and after):")
        lines += [f"  {r.name}: {r.summary}" for r in plan.provenance]
    if getattr(plan, "sparsity", None) is not None:
        lines.append("sparse layers (the sparse lever; plan.sparsity):")
        lines += [f"  {line}" for line in str(plan.sparsity).splitlines()]
    return "\n".join(lines)


def _exactness(plan) -> str:
    if getattr(plan, "sparsity", None) is not None:
        cast = any(r.name == "precision" for r in plan.provenance)
        also = " and low-precision compute" if cast else ""
        return f" (lossy: sparse weights{also}, the gradients are the sparse model's)"
    if any(r.name == "precision" for r in plan.provenance):
        return " (lossy: low-precision compute, gradients within its tolerance of fp32's)"
    return (" (exact: gradients equal eager PyTorch's"
            + (", unless BatchNorm runs per microbatch)" if getattr(plan, "microbatch", None)
               else ")"))


def plot_plan(before, measured_before, plan, measured, path: str | Path = "plan.png",
              title: str = "") -> Path:
    """The step before and after planning, side by side on one scale: each panel stacks the
    predicted bytes by category over the step (its plan's ``timeline``) and draws the measured
    live bytes on top, against the bytes allocated so far (as in :func:`plot_memory`); the
    budget is a line across both.

    ``before`` is the unoptimised step's plan (a budget no step reaches: nothing recomputed),
    ``plan`` the one under the budget; ``measured_before`` and ``measured`` are
    :class:`fxmem.memory.measure.MeasuredMemory` of one step each (either may be None).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc

    mib = 2.0**20
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    panels = ((axes[0], before, measured_before, "unoptimised (nothing recomputed)"),
              (axes[1], plan, measured, "planned"))
    for k, (ax, p, m, name) in enumerate(panels):
        live = p.timeline.live / mib
        x = _fraction(p.timeline.allocated)
        keep = [c for c in range(len(CATEGORIES)) if live[:, c].any()]
        ax.stackplot(x, live[:, keep].T, labels=[CATEGORIES[c] for c in keep], alpha=0.75,
                     step="post")
        ax.axhline(p.predicted_peak / mib, color="k", ls="--", lw=0.8,
                   label=f"predicted peak {format_bytes(p.predicted_peak)}")
        if m is not None:
            ax.plot(_fraction(m.allocated), m.live / mib, color="crimson", lw=1.0,
                    drawstyle="steps-post", label=f"measured ({format_bytes(m.peak)} peak)")
        ax.axhline(plan.budget / mib, color="tab:blue", lw=1.4,
                   label=f"budget {format_bytes(plan.budget)}")
        if 0 < p.timeline.backward_start < len(live):
            ax.axvline(x[p.timeline.backward_start], color="grey", lw=0.8, ls=":")
        ax.set_title(f"{name}: predicted {format_bytes(p.predicted_peak)}"
                     + ("" if m is None else f", measured {format_bytes(m.peak)}"), fontsize=10)
        ax.set_xlabel("bytes allocated so far (fraction of the step's total)")
        ax.set_xlim(0, 1)
        # the categories once (right), the peaks and the budget on each panel's upper right
        handles, labels = ax.get_legend_handles_labels()
        lines = [i for i, lab in enumerate(labels) if lab not in CATEGORIES]
        chosen = range(len(labels)) if k == 1 else lines
        ax.legend([handles[i] for i in chosen], [labels[i] for i in chosen], loc="upper right",
                  fontsize=7)
    axes[0].set_ylabel("MiB live")
    top = max([before.predicted_peak, plan.predicted_peak, plan.budget]
              + [m.peak for m in (measured_before, measured) if m is not None])
    axes[0].set_ylim(0, 1.3 * top / mib)  # headroom for the legends above the curves
    fig.suptitle(title or "fxmem: the step before and after planning")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
