"""``fxmem inspect``: everything a plan did, written to a folder a person can read.

    fxmem inspect my_models:make --budget 60% --out inspect/

writes (:func:`write_inspection`):

- ``plan.txt``: the plan's report (``plan.report()``);
- ``graphs/{joint,forward,backward}.py``: the graphs as readable code (the joint graph the
  planner was given; the forward and backward it returned);
- ``graphs/{forward,backward}.dot`` and ``.svg``: the graphs drawn by
  :class:`torch.fx.passes.graph_drawer.FxGraphDrawer` (needs ``pydot``; the SVG also Graphviz's
  ``dot`` program: without them the folder says what to install, nothing fails);
- ``passes/NN-NAME/``: for each pass of ``plan.provenance``, each graph's code before and after
  it and ``changes.diff`` (a unified diff), with the pass's one-line summary in the index;
- ``memory.png``: the predicted memory over the step against the measured, unoptimised and
  planned, and the budget (when the steps were measured);
- ``index.md``: what is where.

The writer returns an :class:`Inspection` (the files and what was skipped, and why);
:func:`format_inspection` prints it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import re
import shutil
from pathlib import Path

__all__ = ["Inspection", "write_inspection", "format_inspection"]

log = logging.getLogger(__name__)

_GRAPHS = ("joint", "forward", "backward")
_DRAWN = ("forward", "backward")


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What :func:`write_inspection` wrote: the folder, its files, and what it skipped (why)."""

    folder: Path
    files: tuple[Path, ...]
    skipped: tuple[str, ...] = ()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "pass"


def dot_program() -> str | None:
    """Graphviz's ``dot`` program (which renders SVG), or None when it is not on PATH."""
    return shutil.which("dot")


def _write(path: Path, text: str, files: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    files.append(path)


def _write_graph_code(plan, folder: Path, files: list[Path]) -> None:
    for name in _GRAPHS:
        gm = plan.graphs.get(name)
        if gm is not None:
            _write(folder / "graphs" / f"{name}.py", f"# {name} graph\n{gm.code}", files)


def _draw_graphs(plan, folder: Path, files: list[Path], skipped: list[str]) -> None:
    """The forward and backward graphs as DOT, and as SVG when Graphviz's ``dot`` is present."""
    if importlib.util.find_spec("pydot") is None:  # FxGraphDrawer needs it
        skipped.append("graph drawings: install pydot (pip install 'fxmem[graph]') and "
                       "Graphviz's dot program for SVG")
        return
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    can_render = dot_program() is not None
    if not can_render:
        skipped.append("SVG: Graphviz's dot program is not on PATH (apt install graphviz, brew "
                       "install graphviz, or conda install graphviz); the .dot files are written")
    for name in _DRAWN:
        gm = plan.graphs.get(name)
        if gm is None:
            continue
        dot = FxGraphDrawer(gm, f"fxmem_{name}").get_dot_graph()
        _write(folder / "graphs" / f"{name}.dot", dot.to_string(), files)
        if can_render:
            path = folder / "graphs" / f"{name}.svg"
            path.write_bytes(dot.create_svg())
            files.append(path)


def _write_passes(plan, folder: Path, files: list[Path]) -> list[str]:
    """Each pass's graphs before and after it, and their diff; the index lines."""
    lines = []
    for k, record in enumerate(plan.provenance, 1):
        where = folder / "passes" / f"{k:02d}-{_slug(record.name)}"
        diff = []
        for graph in sorted(set(record.before) | set(record.after)):
            before, after = record.before.get(graph, ""), record.after.get(graph, "")
            _write(where / f"{graph}.before.py", before, files)
            _write(where / f"{graph}.after.py", after, files)
            diff += difflib.unified_diff(before.splitlines(keepends=True),
                                         after.splitlines(keepends=True),
                                         f"{graph} before {record.name}",
                                         f"{graph} after {record.name}")
        _write(where / "changes.diff", "".join(diff), files)
        lines.append(f"- `{where.relative_to(folder)}/`: **{record.name}**: {record.summary}")
    return lines


def write_inspection(plan, folder: str | Path, *, before=None, measured_before=None,
                     measured=None, title: str = "") -> Inspection:
    """Write ``plan`` (a :class:`fxmem.Plan`) to ``folder``: its report, its graphs as code and
    drawings, each pass's graphs before and after, and -- with ``before`` (the unoptimised
    step's plan) or ``measured`` (:class:`fxmem.memory.measure.MeasuredMemory` of the planned
    step) -- the memory plot, predicted against measured."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    skipped: list[str] = []
    _write(folder / "plan.txt", plan.report() + "\n", files)
    _write_graph_code(plan, folder, files)
    _draw_graphs(plan, folder, files, skipped)
    pass_lines = _write_passes(plan, folder, files)
    if before is not None or measured is not None:
        try:
            from fxmem.planning.report import plot_plan

            files.append(plot_plan(before or plan, measured_before, plan, measured,
                                   folder / "memory.png", title=title))
        except ImportError as exc:
            skipped.append(f"memory.png: {exc}")
    else:
        skipped.append("memory.png: the steps were not measured")
    index = [f"# fxmem inspect{': ' + title if title else ''}", "",
             "- `plan.txt`: the plan's report",
             "- `graphs/`: the joint graph given to the planner, and the forward and backward it "
             "returned, as code (`.py`) and drawn (`.dot`, `.svg`)",
             *pass_lines]
    if any(p.name == "memory.png" for p in files):
        index.append("- `memory.png`: predicted memory over the step against measured, "
                     "unoptimised and planned, with the budget")
    index += ["", *(f"skipped: {s}" for s in skipped)]
    _write(folder / "index.md", "\n".join(index) + "\n", files)
    log.info("fxmem inspect: %d files in %s", len(files), folder)
    return Inspection(folder, tuple(files), tuple(skipped))


def format_inspection(inspection: Inspection) -> str:
    """What was written, a line a file (relative to the folder), then what was skipped."""
    lines = [f"fxmem inspect: {len(inspection.files)} files in {inspection.folder}"]
    lines += [f"  {p.relative_to(inspection.folder)}" for p in sorted(inspection.files)]
    lines += [f"skipped: {s}" for s in inspection.skipped]
    return "\n".join(lines)
