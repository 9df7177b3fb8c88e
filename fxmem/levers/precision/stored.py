"""Saved activations stored in fewer bits: the solver's third choice beside saving and recomputing.

With the precision lever in a plan, every large fp32 forward value the backward reads may also be
*stored low*: kept for the backward as a bf16 copy made right after it, and restored to fp32
where the backward first reads it. The choice is made per value by the recompute solver, with
its bytes and its time, among the others:

1. :func:`offer_stored_low` rewrites the joint graph once: after each such value ``v`` a cast
   ``low = convert(v, bf16)`` (a forward node) and, before ``v``'s first backward reader, a cast
   back ``restored = convert(low, fp32)``, which the backward reads in place of ``v``. The recompute
   problem then has ``low`` as a candidate: saving it keeps half of ``v``'s bytes (the solver
   pays the two casts' time, :data:`TIE_BREAK` more, as its save cost); not saving it means the
   backward reads ``v`` itself (saved or recomputed), priced at no extra time.
2. :func:`unwind_unsaved` carries that second reading out on each planned backward: where ``low``
   is not received from the forward, the casts are removed and the backward reads ``v`` as the
   exact plan would -- so a value is rounded only where the plan stores it low.

Lossy (a stored-low value is rounded to bf16 before the backward reads it), so only with
``"precision"`` allowed; a plan without the precision lever is not touched.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx

from fxmem.budget import format_bytes
from fxmem.graph.joint import forward_node_names
from fxmem.graph.ops import is_pointwise, is_view
from fxmem.levers.precision.stored_8bit import (BLOCK, EightBit, can_quantise, offer_8bit,
                                                 unwind_8bit)

__all__ = ["StoredLow", "StoredLowRecord", "offer_stored_low", "unwind_unsaved", "record_stored",
           "MIN_BYTES", "TIE_BREAK", "PASS_NAME"]

log = logging.getLogger(__name__)

PASS_NAME = "stored-low"
MIN_BYTES = 64 * 1024  # smaller values save too little to be worth a rounding
NEAR = 16  # nodes: a pointwise value's forward readers this close get their own copy of it
TIE_BREAK = 1e-7  # seconds added to storing a value low: at equal time, the exact choice wins
_CONVERT = torch.ops.prims.convert_element_type.default
_ELIGIBLE = (torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class StoredLow:
    """One value offered to be stored low: ``value`` (a forward node), ``low`` (its low copy, a
    forward node the plan may save) and ``restored`` (the backward's copy in ``value``'s dtype);
    ``nbytes``: ``value``'s bytes, ``low_nbytes``: the low copy's."""

    value: str
    low: str
    restored: str
    nbytes: int
    low_nbytes: int
    copies: tuple[str, ...] = ()  # forward copies of ``value`` for its other readers
    eight_bit: EightBit | None = None  # offered in 8 bits too (``restored`` is then its dequant)


@dataclasses.dataclass(frozen=True)
class StoredLowRecord:
    """What a plan stores low: the values (forward node names) stored in ``dtype``, their bytes
    and the low copies' bytes, of ``offered`` values the solver could have stored low; with
    8 bits offered, the values stored in 8 bits (``values_8bit``) and their bytes likewise."""

    dtype: str
    values: tuple[str, ...]
    nbytes: int
    low_nbytes: int
    offered: int
    values_8bit: tuple[str, ...] = ()
    nbytes_8bit: int = 0
    low_nbytes_8bit: int = 0

    def summary(self) -> str:
        text = (f"{len(self.values)} of {self.offered} large fp32 values saved for the backward "
                f"are stored in {self.dtype} ({format_bytes(self.nbytes)} kept as "
                f"{format_bytes(self.low_nbytes)}, {format_bytes(self.nbytes - self.low_nbytes)} "
                "saved)")
        if self.values_8bit:
            text += (f" and {len(self.values_8bit)} in 8 bits with a scale per "
                     f"{BLOCK} values ({format_bytes(self.nbytes_8bit)} kept as "
                     f"{format_bytes(self.low_nbytes_8bit)}, "
                     f"{format_bytes(self.nbytes_8bit - self.low_nbytes_8bit)} saved)")
        return text + " and restored in the backward"


def _tensor(node: torch.fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def offer_stored_low(joint: torch.fx.GraphModule, num_fwd_outputs: int, dtype: torch.dtype, *,
                     min_bytes: int = MIN_BYTES, eight_bit: bool = False
                     ) -> tuple[StoredLow, ...]:
    """Add the cast pairs for every fp32 forward value of at least ``min_bytes`` that the backward
    reads (not the step's outputs, not views: they are remade from their base) to ``joint``, in
    place; returns them. ``eight_bit``: offer each value in 8 bits as well, where it can be
    (:mod:`fxmem.levers.precision.stored_8bit`)."""
    graph = joint.graph
    forward = forward_node_names(joint, num_fwd_outputs)
    outputs = {n.name for n in graph.output_node().args[0][:num_fwd_outputs]
               if isinstance(n, torch.fx.Node)}
    order = {n: i for i, n in enumerate(graph.nodes)}
    offered = []
    for node in list(graph.nodes):
        val = _tensor(node)
        if (node.op != "call_function" or node.name not in forward or node.name in outputs
                or val is None or val.dtype not in _ELIGIBLE or is_view(node)):
            continue
        nbytes = val.numel() * val.element_size()
        readers = [u for u in node.users if u.name not in forward and u.op != "output"]
        if nbytes < min_bytes or not readers:
            continue
        with graph.inserting_after(node):
            low = graph.call_function(_CONVERT, (node, dtype))
        with val.fake_mode:
            low.meta["val"] = _CONVERT(val, dtype)
        low.meta["partitioner_tag"] = "is_forward"
        for key in ("nn_module_stack", "stack_trace", "seq_nr"):
            if key in node.meta:
                low.meta[key] = node.meta[key]
        first = min(readers, key=lambda u: order[u])
        with graph.inserting_before(first):
            restored = graph.call_function(_CONVERT, (low, val.dtype))
        with val.fake_mode:
            restored.meta["val"] = _CONVERT(low.meta["val"], val.dtype)
        for reader in readers:
            reader.replace_input_with(node, restored)
        copies = _one_copy_per_reader(graph, node, low, order)
        eight = None
        if eight_bit and can_quantise(val):
            eight = offer_8bit(graph, low, restored, {k: v for k, v in low.meta.items()
                                                      if k != "val"})
        offered.append(StoredLow(node.name, low.name,
                                 restored.name if eight is None else eight.restored, nbytes,
                                 low.meta["val"].numel() * low.meta["val"].element_size(),
                                 copies, eight))
    graph.lint()
    joint.recompile()
    log.debug("stored-low: %d values offered, %s", len(offered),
              format_bytes(sum(s.nbytes for s in offered)))
    return tuple(offered)


def _one_copy_per_reader(graph: torch.fx.Graph, node: torch.fx.Node, low: torch.fx.Node,
                         order) -> tuple[str, ...]:
    """Give each other forward reader of a pointwise ``node`` close to it its own copy of it, so
    that Inductor, which realises a pointwise value read twice (on a CPU, when its loop body is
    heavy: a log-softmax's output), can compute it inside each reader instead: the low copy is
    then made straight from ``node``'s inputs, without ``node``'s full-precision buffer beside
    it (a cross-entropy's log-probabilities are never held in fp32). Exact: each copy computes
    the same values (random ops are not copied)."""
    others = [u for u in node.users if u is not low]
    random = torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
    if (not is_pointwise(node) or random or not others
            or any(u.op != "call_function" or order.get(u, 0) - order[node] > NEAR for u in others)):
        return ()
    copies = []
    for user in others:
        with graph.inserting_before(user):
            copy = graph.node_copy(node)
        val = node.meta["val"]
        with val.fake_mode:  # its own storage (the memory model tells storages by their tensors)
            copy.meta = {**node.meta, "val": torch.empty_strided(
                val.shape, val.stride(), dtype=val.dtype, device=val.device)}
        user.replace_input_with(node, copy)
        copies.append(copy.name)
    return tuple(copies)


def save_costs(offered: tuple[StoredLow, ...], costs) -> dict[str, float]:
    """The time storing each value low adds (its two casts), by low node name; with 8 bits
    offered, the time storing it in 8 bits adds (the quantisation and the dequantisation, more
    than the casts: at equal memory bf16 wins), by codes node name, and the quantisation's
    other nodes priced higher still (saving one of them instead of the codes is never the
    cheaper way to the same rounding)."""
    out = {}
    for s in offered:
        cast = float(costs.get(s.low, 0.0))
        if s.eight_bit is None:
            out[s.low] = cast + float(costs.get(s.restored, 0.0)) + TIE_BREAK
            continue
        e = s.eight_bit
        out[s.low] = 2 * cast + TIE_BREAK  # the cast back is not in the graph: as dear as this
        eight = (out[s.low] + TIE_BREAK
                 + sum(float(costs.get(n, 0.0)) for n in (*e.forward, *e.backward)))
        out.update({n: eight + TIE_BREAK for n in e.forward})
        out[e.q] = eight
        out[e.scale] = TIE_BREAK  # tiny; it goes with the codes
    return out


def unwind_unsaved(forward: torch.fx.GraphModule, backward: torch.fx.GraphModule,
                   offered: tuple[StoredLow, ...]) -> tuple[StoredLow, ...]:
    """Remove, from a plan's graphs, the casts of every value whose low copy the forward does
    not pass the backward -- the backward reads the value itself -- and the value's copies for
    its other forward readers. Returns the values stored low."""
    nodes = {n.name: n for n in backward.graph.nodes}
    stored = []
    for s in offered:
        if s.eight_bit is not None:
            how = unwind_8bit(backward, s.eight_bit, s.low)
            if how != "none":
                stored.append(dataclasses.replace(s, low_nbytes=s.eight_bit.nbytes)
                              if how == "8bit" else dataclasses.replace(s, eight_bit=None))
                continue
            _merge_copies(forward, s)
            _merge_copies(backward, s)
            continue
        low, restored = nodes.get(s.low), nodes.get(s.restored)
        if low is not None and low.op == "placeholder":
            stored.append(s)
            continue
        _merge_copies(forward, s)
        _merge_copies(backward, s)
        if restored is None or low is None:
            continue  # the backward reads neither (an unused value)
        value = low.args[0]
        restored.replace_all_uses_with(value)
        backward.graph.erase_node(restored)
        if not low.users:
            backward.graph.erase_node(low)
    for gm in (forward, backward):
        gm.graph.lint()
        gm.recompile()
    return tuple(stored)


def _merge_copies(gm: torch.fx.GraphModule, s: StoredLow) -> None:
    """Readers of ``s``'s copies in ``gm`` read the value itself (where ``gm`` has it)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    value = nodes.get(s.value)
    if value is None:
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for name in s.copies:
        copy = nodes.get(name)
        if copy is None or order[copy] < order[value]:
            continue
        copy.replace_all_uses_with(value)
        gm.graph.erase_node(copy)


def record_stored(stored: tuple[StoredLow, ...], offered: int, dtype: torch.dtype
                  ) -> StoredLowRecord:
    """What :func:`unwind_unsaved` returned, as a record: a value it returns with its 8-bit
    offer kept is stored in 8 bits (its ``low_nbytes`` then the codes' and scales')."""
    low = [s for s in stored if s.eight_bit is None]
    eight = [s for s in stored if s.eight_bit is not None]
    return StoredLowRecord(dtype=str(dtype).removeprefix("torch."),
                           values=tuple(s.value for s in low),
                           nbytes=sum(s.nbytes for s in low),
                           low_nbytes=sum(s.low_nbytes for s in low), offered=offered,
                           values_8bit=tuple(s.value for s in eight),
                           nbytes_8bit=sum(s.nbytes for s in eight),
                           low_nbytes_8bit=sum(s.low_nbytes for s in eight))
