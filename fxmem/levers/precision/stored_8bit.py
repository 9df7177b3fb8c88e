"""Saved values stored in 8 bits: blockwise int8 codes with one fp32 scale per :data:`BLOCK`
values, the solver's fourth choice beside saving, recomputing and storing in bf16.

Opt-in (``fxmem.optimize(..., stored_bits=8)`` with ``"precision"`` allowed): an activation
rounded to 8 bits loses more than one rounded to bf16, so the accuracy is measured apart
(``bench/accuracy.py --modes bf16-stored8``).

The offer is nested in the bf16 one (:func:`fxmem.levers.precision.stored.offer_stored_low`):
for a value ``v`` with its bf16 copy ``low``, the forward may quantise ``low``::

    blocks = low.view(n // BLOCK, BLOCK)
    scale  = max(|blocks|, per block) / 127          (fp32, at least the smallest normal)
    q      = round(blocks / scale).to(int8)          (|q| <= 127)

and the backward reads ``q.to(fp32) * scale`` (viewed as ``v``) where it read ``v``. Each
choice is then one the recompute solver can make per value:

- save ``q`` and ``scale`` (about a quarter of ``v``'s bytes): stored in 8 bits;
- save ``low`` (half): the backward would quantise it again; the plan instead restores ``low``
  to fp32 directly (:func:`unwind_8bit`), so the value is stored in bf16;
- save ``v`` or recompute it: the quantisation is removed and the backward reads ``v``.

The quantisation and dequantisation are free in the solver's eyes (their nodes' costs are
zero, :func:`free_nodes`); storing in 8 bits pays their time, and more than storing in bf16
(:func:`fxmem.levers.precision.stored.save_costs`), so at equal memory the less lossy choice wins.
A value whose size is not a multiple of :data:`BLOCK`, or that is not contiguous, is offered
in bf16 only.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx


__all__ = ["EightBit", "BLOCK", "can_quantise", "offer_8bit", "unwind_8bit", "free_nodes",
           "interior_nodes"]

BLOCK = 128  # values per scale: the scale adds 4 / BLOCK bytes a value (3%)
_A = torch.ops.aten
_CONVERT = torch.ops.prims.convert_element_type.default
_TINY = torch.finfo(torch.float32).tiny


@dataclasses.dataclass(frozen=True)
class EightBit:
    """The quantisation offered for one value: ``q`` (int8 codes, [n // BLOCK, BLOCK]) and
    ``scale`` (fp32, [n // BLOCK, 1]), forward nodes the plan may save; ``forward``: every
    forward node of the quantisation, in order; ``backward``: the dequantisation's nodes, the
    last the value's restored copy; ``nbytes``: the codes' and scales' bytes."""

    q: str
    scale: str
    forward: tuple[str, ...]
    backward: tuple[str, ...]
    nbytes: int

    @property
    def restored(self) -> str:
        return self.backward[-1]


def can_quantise(val: torch.Tensor) -> bool:
    """Whether a saved value may be offered in 8 bits: fp32, contiguous, whole blocks."""
    return (val.dtype == torch.float32 and val.numel() > 0 and val.numel() % BLOCK == 0
            and val.is_contiguous())


class _Emitter:
    """Adds call_function nodes one after another, each with its fake value and ``meta``."""

    def __init__(self, graph: torch.fx.Graph, fake_mode, meta: dict):
        self.graph, self.fake_mode, self.meta = graph, fake_mode, meta
        self.names: list[str] = []

    def __call__(self, target, *args) -> torch.fx.Node:
        node = self.graph.call_function(target, args)
        vals = torch.fx.node.map_arg(args, lambda n: n.meta["val"])
        with self.fake_mode:
            node.meta.update(self.meta, val=target(*vals))
        self.names.append(node.name)
        return node


def offer_8bit(graph: torch.fx.Graph, low: torch.fx.Node, restored: torch.fx.Node,
               forward_meta: dict) -> EightBit:
    """Insert the quantisation of ``low`` after it and the dequantisation before ``restored``
    (``low``'s cast back to fp32, which the backward's readers read); the readers then read the
    dequantised value and ``restored`` is erased. ``forward_meta``: meta for forward nodes."""
    val = restored.meta["val"]
    fake_mode = val.fake_mode
    shape, blocks = list(val.shape), [val.numel() // BLOCK, BLOCK]
    fwd = _Emitter(graph, fake_mode, forward_meta)
    cursor = low

    def emit(target, *args):  # the quantisation: each node right after the one before
        nonlocal cursor
        with graph.inserting_after(cursor):
            cursor = fwd(target, *args)
        return cursor

    flat = emit(_A.view.default, low, blocks)
    peak = emit(_A.amax.default, emit(_A.abs.default, flat), [1], True)
    scale = emit(_A.clamp_min.default,
                 emit(_A.div.Tensor, emit(_CONVERT, peak, torch.float32), 127.0), _TINY)
    ratio = emit(_A.div.Tensor, emit(_CONVERT, flat, torch.float32), scale)
    q = emit(_CONVERT, emit(_A.round.default, ratio), torch.int8)
    bwd = _Emitter(graph, fake_mode, {})
    with graph.inserting_before(restored):
        out = bwd(_A.view.default,
                  bwd(_A.mul.Tensor, bwd(_CONVERT, q, torch.float32), scale), shape)
    restored.replace_all_uses_with(out)
    graph.erase_node(restored)
    nbytes = q.meta["val"].numel() + 4 * scale.meta["val"].numel()
    return EightBit(q.name, scale.name, tuple(fwd.names), tuple(bwd.names), nbytes)


def interior_nodes(offers) -> frozenset[str]:
    """The quantisation's nodes other than the codes and the scale, for every value offered in
    8 bits: never worth saving (the codes hold the same rounding in fewer bytes), so the solver
    need not decide them."""
    return frozenset(name for e in offers if e is not None for name in e.forward
                     if name not in (e.q, e.scale))


def free_nodes(offers) -> frozenset[str]:
    """The quantisation's and dequantisation's nodes, for every value offered in 8 bits: their
    time is charged to storing in 8 bits, not to recomputing them."""
    return frozenset(name for e in offers if e is not None for name in (*e.forward, *e.backward))


def unwind_8bit(backward: torch.fx.GraphModule, e: EightBit, low_name: str) -> str:
    """Carry out the plan's choice for one value offered in 8 bits, on its backward graph:
    ``"8bit"`` when the backward receives the codes; ``"bf16"`` when it receives the bf16 copy
    (the dequantisation is replaced by the copy's cast to fp32); else ``"none"`` (the backward
    reads the value itself, recomputed or saved, and the quantisation is removed). Does not
    recompile."""
    graph = backward.graph
    nodes = {n.name: n for n in graph.nodes}
    q, low, out = nodes.get(e.q), nodes.get(low_name), nodes.get(e.restored)
    received = {n for n in (e.q, *e.forward) if n in nodes and nodes[n].op == "placeholder"}
    if e.q in received:
        return "8bit"
    if out is None:
        return "none"  # the backward reads neither (an unused value)
    if low is not None and low.op == "placeholder":
        with graph.inserting_before(out):
            back = graph.call_function(_CONVERT, (low, torch.float32))
        with low.meta["val"].fake_mode:
            back.meta["val"] = _CONVERT(low.meta["val"], torch.float32)
        out.replace_all_uses_with(back)
        _erase_unused(graph, nodes, (*e.forward, *e.backward))
        return "bf16"
    if low is None:  # the plan saved a step of the quantisation itself: rounded in the backward
        return "8bit"
    out.replace_all_uses_with(low.args[0])
    _erase_unused(graph, nodes, (low_name, *e.forward, *e.backward))
    return "none"


def _erase_unused(graph: torch.fx.Graph, nodes: dict, names) -> None:
    """Erase the named nodes nothing reads, last first (a node freed by a later one's erasure
    goes too)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    present = sorted((nodes[n] for n in set(names) if n in nodes), key=order.__getitem__,
                     reverse=True)
    for node in present:
        if not node.users and node.op != "placeholder":
            graph.erase_node(node)
