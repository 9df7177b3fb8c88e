"""Recompute pass: split a joint graph into forward and backward graphs that save only a chosen
set of values; everything else the backward needs is recomputed inside it.

The split is AOTAutograd's own (``_extract_fwd_bwd_modules``): the backward graph is traced from
the saved values, the primals and the tangents to the gradients, so the forward ops it needs and
cannot read are copied into it. This pass then sinks every copied op to just before its first use
(recursively, last first), so a recomputed value lives only while it is needed, and returns a
record of what it did.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import torch
import torch.fx

from fxmem.graph import torch_compat
from fxmem.graph.joint import forward_node_names
from fxmem.graph.ops import is_view, writes_argument
from fxmem.passes.base import GraphPass, PassInvariantError, StepGraphs

__all__ = ["RecomputeRecord", "RecomputeSplit", "SaveDecision", "split_with_saved", "sink_recomputed",
           "remove_dead", "RECOMPUTED"]

RECOMPUTED = "fxmem_recomputed"  # node.meta key: a forward op the backward runs again

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RecomputeRecord:
    """What the pass did: which forward values the backward receives, which forward ops it runs
    again, and how many it moved to their first use."""

    saved: tuple[str, ...]
    recomputed: tuple[str, ...]  # forward ops that compute again in the backward
    views: tuple[str, ...]  # forward views re-derived in the backward (free)
    moved: int
    replayed: tuple[str, ...] = ()  # random ops among `recomputed`, replayed from a saved RNG state

    def summary(self) -> str:
        return (f"{len(self.saved)} values saved for backward, {len(self.recomputed)} forward ops "
                f"recomputed in backward ({len(self.replayed)} random, replayed from saved RNG "
                f"states), {len(self.views)} views re-derived ({self.moved} moved to first use)")


def _is_sym(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def split_with_saved(
    joint: torch.fx.GraphModule, saved: Iterable[str], *, num_fwd_outputs: int,
    buffers: Iterable[str] = (),
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, RecomputeRecord]:
    """Forward and backward graphs of ``joint`` that pass exactly ``saved`` (node names) plus the
    primals and forward outputs the backward reads; the rest is recomputed.

    ``buffers`` names primals the step may mutate (BatchNorm's running statistics): the runtime
    writes their new values after the forward, so a backward that recomputes from one receives a
    copy taken before the write instead of the buffer itself."""
    joint.graph.lint()
    nodes = {n.name: n for n in joint.graph.nodes}
    forward = forward_node_names(joint, num_fwd_outputs)
    missing = [s for s in saved if s not in nodes or s not in forward]
    if missing:
        raise ValueError(f"cannot save nodes that are not forward nodes of the joint graph: {missing[:5]}")
    output = joint.graph.output_node()
    fwd_outputs = [n for n in output.args[0][:num_fwd_outputs] if isinstance(n, torch.fx.Node)]
    primals = [n for n in joint.graph.nodes if n.op == "placeholder" and n.name in forward]
    saved_values = list(dict.fromkeys(
        [nodes[s] for s in saved] + primals + [n for n in fwd_outputs if n.op != "placeholder"]
    ))
    saved_sym = [n for n in joint.graph.nodes if n.name in forward and _is_sym(n)]
    saved_values = [n for n in saved_values if not _is_sym(n)]
    fw, bw = torch_compat.EXTRACT_FWD_BWD_MODULES()(
        joint, saved_values, saved_sym, num_fwd_outputs=num_fwd_outputs
    )
    remove_dead(bw)
    _save_copies_of(fw, bw, set(buffers), num_fwd_outputs)
    copied = [n for n in bw.graph.nodes if n.op == "call_function" and n.name in forward]
    moved = sink_recomputed(bw, {n.name for n in copied})
    for n in copied:  # Inductor's fusion keeps them where they are (passes.inductor_order)
        n.meta[RECOMPUTED] = True
    recomputed = [n.name for n in copied if not is_view(n)]
    views = [n.name for n in copied if is_view(n)]
    received = tuple(n.name for n in bw.graph.nodes if n.op == "placeholder" and n.name in forward
                     and n.name not in {p.name for p in primals})
    record = RecomputeRecord(saved=received, recomputed=tuple(recomputed), views=tuple(views),
                             moved=moved)
    log.debug("recompute pass: %s", record.summary())
    return fw, bw, record


def _save_copies_of(fw, bw, buffers: set[str], num_fwd_outputs: int) -> None:
    """Pass the backward a clone of each buffer it reads, taken before the forward's writes."""
    bw_placeholder = {n.name: n for n in bw.graph.nodes
                      if n.op == "placeholder" and n.name in buffers}
    read = set(bw_placeholder)
    if not read:
        return
    output = fw.graph.output_node()
    outs = list(output.args[0])
    first_op = next(n for n in fw.graph.nodes if n.op != "placeholder")
    for i, node in enumerate(outs):
        if i >= num_fwd_outputs and isinstance(node, torch.fx.Node) and node.name in read:
            with fw.graph.inserting_before(first_op):
                copy = fw.graph.call_function(torch.ops.aten.clone.default, (node,))
            val = node.meta["val"]
            with val.fake_mode:
                copy.meta["val"] = val.clone()
            outs[i] = copy
            # the backward receives the copy: its placeholder is that value (the memory model
            # matches a backward placeholder to a forward value by its fake tensor), so the copy
            # is counted as saved until the backward is done with it
            # (a new meta dict: the split may share one between the graphs' placeholders)
            received = bw_placeholder[node.name]
            received.meta = {**received.meta, "val": copy.meta["val"]}
    output.args = (tuple(outs),)
    fw.graph.lint()
    fw.recompile()


def remove_dead(gm: torch.fx.GraphModule) -> int:
    """Delete nodes whose results nobody reads, random ones included (FX keeps those as impure);
    only ops that write to an argument stay. A backward that reran a forward random op just to
    drop it would also advance the global RNG, so later steps' dropout would differ from eager."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function" or node.users:
            continue
        target = node.target
        if not (torch_compat.is_op_overload(target) and writes_argument(node)):
            gm.graph.erase_node(node)
            removed += 1
    return removed


def sink_recomputed(gm: torch.fx.GraphModule, names: set[str]) -> int:
    """Move each named node to just before its first user, last nodes first; returns moves."""
    moved = 0
    # each node's place, kept in the graph's order as nodes move: a moved node takes a key
    # between its new neighbours' (all keys renumbered only when floats run out between them)
    order = {n: float(i) for i, n in enumerate(gm.graph.nodes)}
    for node in reversed([n for n in gm.graph.nodes if n.name in names]):
        users = list(node.users)
        if not users:
            continue
        first = min(users, key=lambda u: order[u])
        if node.next is not first:
            before = order[first.prev] if first.prev in order else order[first] - 1.0
            first.prepend(node)
            moved += 1
            key = (before + order[first]) / 2
            if before < key < order[first]:
                order[node] = key
            else:
                order = {n: float(i) for i, n in enumerate(gm.graph.nodes)}
    gm.graph.lint()
    gm.recompile()
    return moved


class RecomputeSplit(GraphPass):
    """The recompute pass as a :class:`~fxmem.passes.base.GraphPass`: the joint graph and a
    :class:`SaveDecision` in, the forward and backward graphs and a :class:`RecomputeRecord`
    out."""

    name = "recompute-split"

    def run(self, graphs: StepGraphs, decision: "SaveDecision") -> tuple[StepGraphs, RecomputeRecord]:
        if graphs.joint is None:
            raise ValueError("the recompute split needs the joint graph")
        fw, bw, record = split_with_saved(graphs.joint, decision.saved,
                                          num_fwd_outputs=graphs.num_fwd_outputs,
                                          buffers=decision.buffers)
        return StepGraphs(graphs.num_fwd_outputs, joint=graphs.joint, forward=fw,
                          backward=bw), record

    def ensures(self, before: StepGraphs, after: StepGraphs) -> None:
        super().ensures(before, after)
        n_out = len(after.forward.graph.output_node().args[0])
        if n_out < after.num_fwd_outputs:
            raise PassInvariantError(f"pass {self.name}: the forward returns {n_out} values, "
                                     f"fewer than the step's {after.num_fwd_outputs} outputs")


@dataclasses.dataclass(frozen=True)
class SaveDecision:
    """Which forward values to save (node names), and the buffers the step may mutate."""

    saved: tuple[str, ...]
    buffers: tuple[str, ...] = ()
