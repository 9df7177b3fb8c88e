"""What the compute casts did to a plan, read from its graphs: the record ``plan.report()`` shows.

The casts are made when the step is captured (:mod:`fxmem.levers.precision.casts`), so the record
is read from the planned graphs: how many matrix products, convolutions and attention ops run in
the low dtype (forward and backward, recomputed ops counted where they run again), how many cast
nodes there are and what the low-precision copies of parameters and inputs weigh, and how many of
the values saved for the backward are held in the low dtype.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import TYPE_CHECKING

import torch
import torch.fx

from fxmem.budget import format_bytes
from fxmem.graph.ops import base_name, node_value, value_nbytes
from fxmem.levers.precision.casts import ComputeCasts, is_compute_op
from fxmem.passes.base import PassRecord

if TYPE_CHECKING:  # pragma: no cover
    from fxmem.planning.planner import Plan

__all__ = ["PrecisionRecord", "describe", "record_of", "PASS_NAME"]

log = logging.getLogger(__name__)

PASS_NAME = "precision"  # the name of the record in plan.provenance
_CASTS = frozenset({"_to_copy", "convert_element_type", "to"})


@dataclasses.dataclass(frozen=True)
class PrecisionRecord:
    """The casts of one plan. ``low_ops``/``fp32_ops``: compute ops (matrix products,
    convolutions, attention) by op name, run in the low dtype / left in fp32; ``casts``: cast nodes
    into the low dtype and back; ``input_copies``: low-precision copies of the graph's inputs
    (parameters, floating inputs) and their bytes; ``saved_low``: values saved for the backward
    in the low dtype (count, bytes) of ``saved`` (all saved values: count, bytes)."""

    dtype: str
    low_ops: tuple[tuple[str, int], ...]
    fp32_ops: tuple[tuple[str, int], ...]
    casts_down: int
    casts_up: int
    input_copies: int
    input_copy_bytes: int
    saved_low: int
    saved_low_bytes: int
    saved: int
    saved_bytes: int
    reason: str = ""

    @property
    def num_low_ops(self) -> int:
        return sum(n for _, n in self.low_ops)

    @property
    def num_fp32_ops(self) -> int:
        return sum(n for _, n in self.fp32_ops)

    def summary(self) -> str:
        ops = ", ".join(f"{name} x{n}" for name, n in self.low_ops) or "none"
        return (f"{self.num_low_ops} matrix-product/convolution/attention ops in {self.dtype} "
                f"({ops}), {self.num_fp32_ops} in fp32; {self.casts_down} casts to {self.dtype} "
                f"and {self.casts_up} back ({self.input_copies} {self.dtype} copies of "
                f"parameters and inputs, {format_bytes(self.input_copy_bytes)}); saved for "
                f"backward: {self.saved_low} of {self.saved} values in {self.dtype}, "
                f"{format_bytes(self.saved_low_bytes)} of {format_bytes(self.saved_bytes)}")


def _dtype(node) -> torch.dtype | None:
    val = node_value(node) if isinstance(node, torch.fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _first_input_dtype(node: torch.fx.Node) -> torch.dtype | None:
    for arg in node.all_input_nodes:
        dtype = _dtype(arg)
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return None


def _is_cast(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and base_name(node.target) in _CASTS


def _count(graphs: list[torch.fx.GraphModule], low: torch.dtype):
    low_ops: collections.Counter[str] = collections.Counter()
    fp32_ops: collections.Counter[str] = collections.Counter()
    down = up = copies = copy_bytes = 0
    for gm in graphs:
        for node in gm.graph.nodes:
            if is_compute_op(node):
                counter = low_ops if _first_input_dtype(node) == low else fp32_ops
                counter[base_name(node.target)] += 1
            elif _is_cast(node):
                src, dst = _first_input_dtype(node), _dtype(node)
                if dst == low and src != low:
                    down += 1
                    if node.all_input_nodes and node.all_input_nodes[0].op == "placeholder" \
                            and gm is graphs[0]:
                        copies, copy_bytes = copies + 1, copy_bytes + value_nbytes(node)
                elif src == low and dst is not None and dst != low:
                    up += 1
    return low_ops, fp32_ops, down, up, copies, copy_bytes


def describe(forward: torch.fx.GraphModule, backward: torch.fx.GraphModule,
             joint: torch.fx.GraphModule, saved: tuple[str, ...], casts: ComputeCasts
             ) -> PrecisionRecord:
    """The record of a plan's ``forward`` and ``backward`` graphs, the ``saved`` values being
    nodes of ``joint`` (the recompute pass's record)."""
    low_ops, fp32_ops, down, up, copies, copy_bytes = _count([forward, backward], casts.dtype)
    nodes = {n.name: n for n in joint.graph.nodes}
    values = [nodes[s] for s in saved if s in nodes and nodes[s].op != "placeholder"]
    low_saved = [n for n in values if _dtype(n) == casts.dtype]
    return PrecisionRecord(
        dtype=casts.dtype_name, low_ops=tuple(sorted(low_ops.items(), key=lambda kv: -kv[1])),
        fp32_ops=tuple(sorted(fp32_ops.items(), key=lambda kv: -kv[1])), casts_down=down,
        casts_up=up, input_copies=copies, input_copy_bytes=copy_bytes, saved_low=len(low_saved),
        saved_low_bytes=sum(value_nbytes(n) for n in low_saved), saved=len(values),
        saved_bytes=sum(value_nbytes(n) for n in values), reason=casts.reason)


def record_of(plan: "Plan", casts: ComputeCasts) -> PassRecord:
    """The plan's compute casts as a :class:`~fxmem.passes.base.PassRecord` (no graph before: the
    casts were made when the step was captured under autocast; after: the planned graphs)."""
    details = describe(plan.graphs["forward"], plan.graphs["backward"], plan.graphs["joint"],
                       plan.record.saved, casts)
    after = {k: plan.graphs[k].code for k in ("joint", "forward", "backward")}
    return PassRecord(PASS_NAME, details.summary(), details, {}, after)
