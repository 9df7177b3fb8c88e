"""The sparse lever: Linear/Conv2d weights stored as their non-zero values.

- decide: the least sparsity that meets the budget, only when the other allowed levers cannot
  (:mod:`fxmem.levers.sparse.fallback`), or the density ``fxmem.optimize(sparse_density=...)``
  forces;
- apply: before capture -- the model's eligible layers are replaced in place
  (:func:`~fxmem.levers.sparse.sparsify`), the user's optimizer pointed at their values, and the
  step is captured and planned as any other (its transient dense weights and O(nnz) parameters,
  gradients and optimizer state are in the joint graph);
- analyse: the sparse layers and what they hold, dense against sparse
  (:class:`~fxmem.levers.sparse.report.SparsityReport`), which :meth:`SparseLever.annotate` puts
  on the plan (``plan.sparsity``, shown by ``plan.report()``) with a note that it is lossy.

Lossy (the pruned weights are zero: the model trains as a sparse model), so opt-in:
``allow=(..., "sparse")``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from fxmem.budget import format_bytes
from fxmem.levers.base import Lever, register
from fxmem.levers.sparse.report import SparsityReport, sparsity_report

if TYPE_CHECKING:  # pragma: no cover
    from fxmem.planning.planner import Plan

__all__ = ["SparseLever", "NOTE_PREFIX"]

log = logging.getLogger(__name__)

NOTE_PREFIX = "sparse:"  # the plan note the lever adds


@register
class SparseLever(Lever):
    name = "sparse"
    exact = False  # the pruned weights are zero: gradients are the sparse model's

    def __init__(self, density: float, reason: str = ""):
        self.density, self.reason = float(density), reason

    def analyse(self, model: nn.Module,
                optimizer: torch.optim.Optimizer | None = None) -> SparsityReport:
        """The model's sparse layers and their bytes (with ``optimizer``'s state)."""
        return sparsity_report(model, optimizer)

    def annotate(self, plan: "Plan", report: SparsityReport) -> None:
        """Put ``report`` (:meth:`analyse` of the sparsified model) on ``plan`` as
        ``plan.sparsity`` and say in its notes that the plan is lossy and why the lever was
        used. Done once per plan."""
        if any(n.startswith(NOTE_PREFIX) for n in plan.notes):
            return
        plan.sparsity = report
        note = (f"{NOTE_PREFIX} {len(report.layers)} Linear/Conv2d layers keep "
                f"{report.density:.1%} of their weights (density {self.density:g}, ERK over the "
                "layers, the first and last weight layers dense), stored as their non-zero "
                "values: their parameters, gradients and optimizer state are O(non-zeros), "
                f"{format_bytes(report.saved_bytes)} less. Lossy: the pruned weights are zero "
                "and the model trains as a sparse model")
        if self.reason:
            note += f". {self.reason}"
        plan.notes = (*plan.notes, note)
        log.info("fxmem sparse: density %.3f over %d layers, %s saved", report.density,
                 len(report.layers), format_bytes(report.saved_bytes))
