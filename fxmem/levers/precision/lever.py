"""The precision lever: matrix products, convolutions and attention in bf16 (or fp16, forced with
``precision="fp16"``, with loss scaling), fp32 master weights.

- decide: :class:`~fxmem.levers.precision.casts.ComputeCasts` for the step's device, only when the
  exact levers cannot meet the budget (:func:`fxmem.levers.precision.fallback.exact_first`);
- apply: at capture -- ``fxmem.optimize`` runs the step under ``torch.autocast`` so the joint graph
  AOTAutograd gives the planner holds the casts; the recompute lever and the memory model then
  plan that graph as any other (a bf16 value counts 2 bytes an element);
- analyse: a plan's graphs -> what the casts did (:class:`PrecisionRecord`), added to the plan's
  provenance and notes by :meth:`PrecisionLever.annotate`.

Lossy (gradients are within bf16's tolerance of fp32's, not equal), so opt-in:
``allow=(..., "precision")``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from fxmem.levers.base import Lever, register
from fxmem.levers.precision.casts import ComputeCasts, casts_for
from fxmem.levers.precision.record import PASS_NAME, PrecisionRecord, describe, record_of

if TYPE_CHECKING:  # pragma: no cover
    from fxmem.planning.planner import Plan

__all__ = ["PrecisionLever"]

log = logging.getLogger(__name__)


@register
class PrecisionLever(Lever):
    name = "precision"
    exact = False  # bf16 compute: gradients within bf16's tolerance of fp32's

    def __init__(self, casts: ComputeCasts):
        if not isinstance(casts, ComputeCasts):
            raise TypeError(f"casts must be a ComputeCasts, got {type(casts).__name__}")
        self.casts = casts

    @classmethod
    def for_device(cls, device: torch.device | str, *, dtype: torch.dtype = torch.bfloat16,
                   reason: str = "") -> "PrecisionLever":
        return cls(casts_for(device, dtype, reason))

    def analyse(self, plan: "Plan") -> PrecisionRecord:
        """What the casts did in ``plan``'s graphs."""
        return describe(plan.graphs["forward"], plan.graphs["backward"], plan.graphs["joint"],
                        plan.record.saved, self.casts)

    def annotate(self, plan: "Plan") -> None:
        """Add the casts' record to ``plan.provenance`` (first: they were made at capture) and
        say in ``plan.notes`` that the plan changes numerics."""
        if any(r.name == PASS_NAME for r in plan.provenance):
            return
        record = record_of(plan, self.casts)
        plan.provenance = (record, *plan.provenance)
        dtype = self.casts.dtype_name
        note = (f"precision: matrix products, convolutions and attention run in {dtype} "
                f"(torch.autocast's {self.casts.device_type} op lists), parameters stay fp32 "
                f"master weights and their gradients fp32; the loss is fp32, other outputs keep "
                f"autocast's dtype. Lossy: gradients are within {dtype}'s tolerance of fp32's, "
                "not equal")
        if self.casts.dtype == torch.float16:
            note += (". float16's backward needs loss scaling: fxmem.optimize scales it unless "
                     "loss_scaling='off' (see the loss scaling line)")
        if self.casts.reason:
            note += f". {self.casts.reason}"
        plan.notes = (*plan.notes, note)
        log.info("fxmem precision: %s", record.summary)
