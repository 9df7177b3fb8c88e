"""What every graph rewrite shares: a pass takes a step's graphs and a decision and returns the
rewritten graphs and a record of what it changed, with the graphs checked before and after it
runs (the ``requires`` / ``ensures`` of ``torch.fx.passes.infra.pass_base``). A pass never solves
anything: the decision is given.

Each record keeps the pass's graphs as code before and after, so a plan can show every
intermediate graph (its provenance, in ``Plan.provenance``).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any

import torch.fx

__all__ = ["StepGraphs", "PassRecord", "GraphPass", "PassInvariantError"]

log = logging.getLogger(__name__)


class PassInvariantError(RuntimeError):
    """A pass broke a graph (fxmem's bug, not the user's): the message names the pass and what."""


@dataclasses.dataclass(frozen=True)
class StepGraphs:
    """A step's graphs at one stage: the joint graph, or the forward and backward it was split
    into (the forward's first ``num_fwd_outputs`` outputs are the caller's; the rest are saved
    for the backward)."""

    num_fwd_outputs: int
    joint: torch.fx.GraphModule | None = None
    forward: torch.fx.GraphModule | None = None
    backward: torch.fx.GraphModule | None = None

    def present(self) -> dict[str, torch.fx.GraphModule]:
        return {k: g for k in ("joint", "forward", "backward")
                if (g := getattr(self, k)) is not None}

    def code(self) -> dict[str, str]:
        """Each graph as readable Python."""
        return {k: g.code for k, g in self.present().items()}


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass did: its name, a one-line summary, its own details (a pass's record type),
    and the graphs' code before and after it."""

    name: str
    summary: str
    details: Any
    before: dict[str, str]
    after: dict[str, str]


class GraphPass(abc.ABC):
    """A rewrite of a step's graphs by a given decision. Subclasses implement :meth:`run`; calling
    the pass checks the graphs (:meth:`requires`), runs it, checks them again (:meth:`ensures`)
    and records what it changed."""

    name: str = "pass"

    @abc.abstractmethod
    def run(self, graphs: StepGraphs, decision: Any) -> tuple[StepGraphs, Any]:
        """The rewritten graphs and the pass's own record of what it changed."""

    def summary(self, details: Any) -> str:
        summary = getattr(details, "summary", None)
        return summary() if callable(summary) else str(details)

    def requires(self, graphs: StepGraphs) -> None:
        """Every graph present is well formed (``Graph.lint``)."""
        for key, gm in graphs.present().items():
            self._lint(gm, f"{key} graph given to it")

    def ensures(self, before: StepGraphs, after: StepGraphs) -> None:
        """Every graph present is well formed, and the step's outputs still number as many."""
        for key, gm in after.present().items():
            self._lint(gm, f"{key} graph it returned")
        if after.num_fwd_outputs != before.num_fwd_outputs:
            raise PassInvariantError(f"pass {self.name} changed the number of forward outputs")

    def _lint(self, gm: torch.fx.GraphModule, what: str) -> None:
        try:
            gm.graph.lint()
        except Exception as exc:  # lint raises a bare RuntimeError with the offending node
            raise PassInvariantError(f"pass {self.name}: the {what} is malformed: {exc}") from exc

    def __call__(self, graphs: StepGraphs, decision: Any) -> tuple[StepGraphs, PassRecord]:
        self.requires(graphs)
        before = graphs.code()
        out, details = self.run(graphs, decision)
        self.ensures(graphs, out)
        record = PassRecord(self.name, self.summary(details), details, before, out.code())
        log.debug("pass %s: %s", self.name, record.summary)
        return out, record
