"""Keep Inductor from moving work away from where fxmem's memory model puts it.

**Delayed matrix products:** a post-grad pass that splits delayed ``addmm``.

Inductor's post-grad pattern ``add(mm(a, b), c) -> addmm(c, a, b)`` places the fused op where the
``add`` was. When ``c`` is made much later than ``a`` and ``b`` -- a tied embedding's gradient,
``embedding_grad + logits_grad.T @ hidden``, whose sum waits for the whole backward -- the product
moves to the end of the backward and keeps its inputs alive until then: on a GPT with an 8192-token
vocabulary the (tokens x vocabulary) logits gradient, 64 MiB, lived through every layer's backward.
This pass undoes that: the product is computed right after its inputs are (where autograd and
fxmem's memory model put it) and only the sum waits. Its output is usually far smaller than its
inputs (a weight gradient against an activation gradient), so the split is kept only where it
frees more than it holds.

**Hoisted recomputation:** Inductor fuses kernels that only share reads ("horizontal" fusion). A
recomputed op placed right before its first use (:mod:`fxmem.passes.recompute`) that reads a saved
activation some earlier kernel also reads is fused into that kernel, so it runs -- and its output
is alive -- from there on: on WRN-28-2 the ReLUs recomputed for two later blocks' convolution
gradients were made one block early, 8 MiB over the plan. :class:`KeepRecomputedInPlace` is an
``InductorChoices`` that refuses horizontal fusions with a recomputed op (``node.meta`` tag
:data:`~fxmem.passes.recompute.RECOMPUTED`) across more than a few kernels; fusing a recomputed op into its consumers
(vertical fusion) is still allowed.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.fx

from fxmem.graph import torch_compat
from fxmem.graph.ops import storage_nbytes
from fxmem.passes.recompute import RECOMPUTED

__all__ = ["SplitDelayedAddmm", "KeepRecomputedInPlace", "keep_recomputed_in_place", "NEAR"]

log = logging.getLogger(__name__)
aten = torch.ops.aten
InductorChoices = torch_compat.INDUCTOR_CHOICES()
CustomGraphPass = torch_compat.CUSTOM_GRAPH_PASS()


class SplitDelayedAddmm(CustomGraphPass):
    """``addmm(c, a, b)`` -> ``mm(a, b)`` after ``a`` and ``b``, and ``add(c, mm)`` in its place,
    where ``c`` is made after both and the product is the last reader of inputs larger than it."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        position = {node: i for i, node in enumerate(graph.nodes)}
        split = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.addmm.default:
                continue
            if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1:
                continue
            c, a, b = node.args[:3]
            if not (isinstance(c, torch.fx.Node) and c.op == "call_function"):
                continue
            mats = [m for m in (a, b) if isinstance(m, torch.fx.Node)]
            if not mats or position[c] <= max(position[m] for m in mats):
                continue  # the sum's other operand is ready first: nothing was delayed
            freed = sum(storage_nbytes(_base(m)) for m in mats if _last_reader(m, position) is node)
            if freed <= storage_nbytes(node):
                continue
            anchor = max(mats, key=lambda m: position[m])
            with graph.inserting_after(anchor):
                product = graph.call_function(aten.mm.default, (a, b))
            product.meta.update(node.meta)
            with graph.inserting_before(node):
                total = graph.call_function(aten.add.Tensor, (c, product))
            total.meta.update(node.meta)
            node.replace_all_uses_with(total)
            graph.erase_node(node)
            split += 1
        if split:
            log.debug("split %d delayed addmm into mm + add", split)

    def uuid(self) -> str:
        return "fxmem.SplitDelayedAddmm.v1"


def _base(node: torch.fx.Node) -> torch.fx.Node:
    """Through views (permute, reshape) to the node that owns the storage."""
    while (node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node)
           and storage_nbytes(node) and storage_nbytes(node) == storage_nbytes(node.args[0])
           and node.meta["val"].untyped_storage()._cdata
           == node.args[0].meta["val"].untyped_storage()._cdata):
        node = node.args[0]
    return node


def _last_reader(mat: torch.fx.Node, position: dict) -> torch.fx.Node:
    """The last node to read ``mat``'s storage (through views of it)."""
    base = _base(mat)
    readers = []
    stack = [base]
    while stack:
        n = stack.pop()
        for user in n.users:
            if user.op == "call_function" and _base(user) is base:
                stack.append(user)  # a view of the same storage
            readers.append(user)
    return max(readers, key=lambda r: position.get(r, -1))


NEAR = 4  # scheduler nodes: a fusion this close moves a recomputed op past next to nothing


def _distance(node1, node2) -> int:
    """How far apart two scheduler nodes are in Inductor's order (``are_long_distant_nodes``)."""
    return max(abs(node1.min_order - node2.max_order), abs(node2.min_order - node1.max_order))


def _has_recomputed(snode) -> bool:
    """Whether an Inductor scheduler node (fused or not) computes a recomputed op."""
    for part in snode.get_nodes():
        for origin in getattr(getattr(part, "node", None), "origins", None) or ():
            if origin.meta.get(RECOMPUTED):
                return True
    return False


class KeepRecomputedInPlace(InductorChoices):
    """Inductor's heuristics, except that no recomputed op is fused horizontally (with a kernel it
    shares only reads with) more than :data:`NEAR` nodes away, which would run it, and keep its
    output, well before its first use. (Most such fusions are with the next kernel and save
    no memory to refuse; that refusing them costs time was not established.)"""

    @staticmethod
    def can_fuse_horizontal(scheduler, node1, node2, shared_data_score) -> bool:
        if (_has_recomputed(node1) or _has_recomputed(node2)) and _distance(node1, node2) > NEAR:
            return False
        return InductorChoices.can_fuse_horizontal(scheduler, node1, node2, shared_data_score)

    def uuid(self) -> str:
        return "fxmem.KeepRecomputedInPlace.v1"


def keep_recomputed_in_place() -> contextlib.AbstractContextManager:
    """Install :class:`KeepRecomputedInPlace` as Inductor's choices handler for this thread."""
    return torch_compat.VIRTUALIZED_V().set_choices_handler(KeepRecomputedInPlace())
