"""The joint planner's points and what is read from them: the choice, the Pareto front, the
table of alternatives and the plot.

Plain data: a :class:`JointPoint` is one combination's predicted peak and time (numbers, no
graph), so the choice (:func:`choose`) and the front (:func:`pareto_front`) are pure functions
of the points :func:`fxmem.planning.joint.explore` planned; :func:`format_alternatives` and
:func:`plot_pareto` present an exploration apart from making it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from fxmem.budget import format_bytes

__all__ = ["JointPoint", "JointExploration", "forced", "choose", "pareto_front", "PREFER", "TIE",
           "format_alternatives", "plot_pareto"]

TIE = 0.01  # predicted times within 1% of the fastest are equal


@dataclasses.dataclass(frozen=True)
class JointPoint:
    """One combination's plan: ``peak`` (bytes) and ``seconds`` as the planner predicts them,
    ``fits`` the budget; ``floor``: the combination's smallest budget (None: not searched);
    ``recomputed``: forward ops the backward runs again."""

    microbatches: int
    precision: str  # "fp32" or "bf16" (compute casts)
    density: float | None  # None: dense weights
    peak: int
    seconds: float
    fits: bool
    floor: int | None = None
    recomputed: int = 0

    @property
    def exact(self) -> bool:
        """Whether the numerics are eager fp32's (recompute and microbatching are exact)."""
        return self.precision == "fp32" and self.density is None

    @property
    def lossiness(self) -> tuple[float, bool]:
        """The ladder's order, least lossy first: exact, bf16, density 0.5, 0.5 + bf16, 0.2..."""
        return (0.0 if self.density is None else 1.0 - self.density, self.precision != "fp32")

    @property
    def levers(self) -> str:
        parts = ["whole batch" if self.microbatches == 1 else f"k={self.microbatches}"]
        parts.append(f"{self.recomputed} recomputed" if self.recomputed else "none recomputed")
        if self.precision != "fp32":
            parts.append(f"{self.precision} compute")
        if self.density is not None:
            parts.append(f"density {self.density:g}")
        return ", ".join(parts)

    @property
    def numerics(self) -> str:
        return "exact" if self.exact else "lossy"


@dataclasses.dataclass(frozen=True)
class JointExploration:
    """What :func:`explore` found: every point planned, the Pareto front, the chosen point (None:
    none fits), the floor over all combinations (bytes), and what was not planned and why."""

    budget: int
    allow: tuple[str, ...]
    points: tuple[JointPoint, ...]
    front: tuple[JointPoint, ...]
    chosen: JointPoint | None
    floor: int | None
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0  # wall time of the exploration

    def optimize_kwargs(self, point: JointPoint | None = None) -> dict:
        """``fxmem.optimize`` keywords that force ``point``'s settings (default: the chosen)."""
        point = point or self.chosen
        if point is None:
            raise ValueError("no point fits the budget")
        return forced(point.microbatches, point.precision, point.density, self.allow)


def forced(k: int, precision: str, density: float | None, allow: Iterable[str]) -> dict:
    """``fxmem.optimize`` keywords that plan with these settings and no others: k microbatches
    (1: the whole batch), the compute precision, the density (None: dense), recomputation on top
    when ``allow`` has it."""
    levers = {"recompute"} & set(allow)
    levers |= {"microbatch"} if k > 1 else set()
    levers |= {"precision"} if precision != "fp32" else set()
    levers |= {"sparse"} if density is not None else set()
    return dict(allow=tuple(sorted(levers)), microbatches=k if k > 1 else None,
                precision=None if precision == "fp32" else precision, sparse_density=density)


PREFER = ("exact", "time")


def choose(points: Iterable[JointPoint], prefer: str = "exact") -> JointPoint | None:
    """The point to run (see the module's docstring); None when none fits. ``prefer="exact"``:
    lossy points only when no exact one fits; ``"time"``: the fastest point that fits, lossy or
    not (among those within 1% of it, the least lossy), so the choice's predicted time never
    rises as the budget grows (more points fit)."""
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {PREFER}, got {prefer!r}")
    fits = [p for p in points if p.fits]
    pool = fits if prefer == "time" else [p for p in fits if p.exact] or fits
    if not pool:
        return None
    fastest = min(p.seconds for p in pool)
    near = [p for p in pool if p.seconds <= fastest * (1.0 + TIE)]
    return min(near, key=lambda p: (p.lossiness, p.seconds, p.peak))


def _dominates(a: JointPoint, b: JointPoint) -> bool:
    no_worse = a.peak <= b.peak and a.seconds <= b.seconds and a.lossiness <= b.lossiness
    return no_worse and (a.peak, a.seconds, a.lossiness) != (b.peak, b.seconds, b.lossiness)


def pareto_front(points: Iterable[JointPoint]) -> tuple[JointPoint, ...]:
    """The points no other point dominates in (peak, seconds, lossiness), by peak."""
    points = list(points)
    front = [p for p in points if not any(_dominates(q, p) for q in points)]
    return tuple(sorted(front, key=lambda p: (p.peak, p.seconds)))


def format_alternatives(exploration: JointExploration, top: int = 8) -> str:
    """The chosen point and the best alternatives as a table: the chosen first, then the other
    points that fit by predicted time, then those that do not by peak."""
    e = exploration
    others = sorted((p for p in e.points if p is not e.chosen),
                    key=lambda p: (not p.fits, p.seconds if p.fits else p.peak))
    rows = ([e.chosen] if e.chosen else []) + others
    base = e.chosen.seconds if e.chosen else None
    header = ("", "levers", "predicted peak", "predicted time", "vs chosen", "numerics", "fits",
              "floor")
    table = [header]
    front = {id(p) for p in e.front}
    for p in rows[:top]:
        mark = ("*" if p is e.chosen else "") + ("^" if id(p) in front else "")
        table.append((mark, p.levers, format_bytes(p.peak), _time(p.seconds),
                      f"{p.seconds / base:.2f}x" if base else "-", p.numerics,
                      "yes" if p.fits else "no", format_bytes(p.floor) if p.floor else "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (f"alternatives under {format_bytes(e.budget)} ({len(e.points)} planned in "
            f"{e.seconds:.1f} s; * chosen, ^ on the Pareto front)")
    notes = []
    if len(rows) > top:
        notes.append(f"{len(rows) - top} more not shown")
    if e.floor is not None:
        notes.append(f"floor over all combinations {format_bytes(e.floor)} ({e.floor} bytes)")
    if e.chosen is None:
        notes.append("no combination fits the budget")
    notes += [f"not planned: {s}" for s in e.skipped]
    return "\n".join([head, *lines, *notes])


def _time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 10 else f"{1e3 * seconds:.1f} ms"


def plot_pareto(exploration: JointExploration, path, *, title: str | None = None):
    """Predicted step time against predicted peak for every point (exact o, lossy ^), the Pareto
    front ringed (its exact points joined), the chosen point starred and the budget as a vertical
    line; a PNG at ``path`` (returned)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plot_pareto needs matplotlib: pip install matplotlib") from exc
    e, mib = exploration, 2**20
    slow = max((p.seconds for p in e.points), default=0.0) >= 10
    scale, unit = (1.0, "s") if slow else (1e3, "ms")
    fig, ax = plt.subplots(figsize=(8, 5))
    for exact, marker, label in ((True, "o", "exact"), (False, "^", "lossy")):
        pts = [p for p in e.points if p.exact == exact]
        if pts:
            ax.scatter([p.peak / mib for p in pts], [scale * p.seconds for p in pts],
                       marker=marker, alpha=0.6, label=f"{label} ({len(pts)})")
    if e.front:  # ringed; the exact points on it as a staircase (in 2-D the lossy ones may
        # look dominated: they are on the front for being less lossy than what beats them)
        ax.scatter([p.peak / mib for p in e.front], [scale * p.seconds for p in e.front], s=120,
                   facecolors="none", edgecolors="tab:green", label="Pareto front")
        exact = [p for p in e.front if p.exact]
        ax.plot([p.peak / mib for p in exact], [scale * p.seconds for p in exact],
                color="tab:green", drawstyle="steps-post", alpha=0.6)
    if e.chosen is not None:
        ax.scatter([e.chosen.peak / mib], [scale * e.chosen.seconds], marker="*", s=250,
                   color="tab:red", zorder=5, label=f"chosen: {e.chosen.levers}")
    ax.axvline(e.budget / mib, color="tab:red", linestyle="--", label="budget")
    if e.floor is not None:
        ax.axvline(e.floor / mib, color="grey", linestyle=":", label="floor over all")
    ax.set_xlabel("predicted peak (MiB)")
    ax.set_ylabel(f"predicted step time ({unit})")
    ax.set_title(title or "fxmem: the combinations planned")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
